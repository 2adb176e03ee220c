# weft: one command to set up and run the main job, one to set up and run the tests.
#   make demo   bootstrap .venv (idempotent) and run the main job on the embedded sample world
#   make test   bootstrap .venv (idempotent) and run the default test suite
#   make ui     the Dagster UI on http://127.0.0.1:3000 (same instance as make demo; UI_PORT=, INSTANCE_DIR= to change)
#   make ablation  the MMFS ablation (paper Tab. 6(a)) on the demo's data (slow)
#   make quality   the quality recipe: the main job's graph on a world of 12,000 pairs and 600 stories (slow)
#   make quality-ablation  the MMFS ablation on the quality recipe, after make quality (slow: ~3 h)
#   make bench  the op's and the data pipeline's benchmarks
#   make test-scale  the slow scale-out tests (Postgres, daemon, Spark, two nodes, browser): see README "Scale out"
#   make test-ablation  the slow test of the MMFS ablation's graph (every variant packed, trained, fine-tuned, reported)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.weft-installed
SCALE_STAMP := $(VENV)/.weft-scale-installed

# Nothing may reach a model hub or an update server.
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export DS_ACCELERATOR := cpu

# The local Dagster instance (make INSTANCE_DIR=... for another) and the UI's port.
INSTANCE_DIR ?= $(CURDIR)/dagster_home
UI_PORT ?= 3000
DAGSTER := DAGSTER_HOME=$(INSTANCE_DIR) $(VENV)/bin/dagster
# An instance folder with the project's settings (telemetry off); an existing dagster.yaml there is left as it is.
instance = mkdir -p $(1) && (test -e $(1)/dagster.yaml || cp orchestration/presets/dagster.yaml $(1)/)
# The sample world's raw shards, as dynamic partitions: the whole set in one run; the ablation's variants likewise.
SAMPLE_WORLD_SHARDS := {"dagster/asset_partition_range_start": "mmc4/docs_shard_0_v2.jsonl.zip", "dagster/asset_partition_range_end": "cc12m/cc12m-00000.tsv"}
ABLATION_VARIANTS := {"dagster/asset_partition_range_start": "mmfs", "dagster/asset_partition_range_end": "many_tokens_no_mmfs"}

.PHONY: setup demo test test-scale test-ablation ui bench ablation quality quality-ablation

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# 0. check the run config (one line per problem, naming file and key); 1. write the sample world and register its
# shards; 2. run the data graph over them, train the checkpoint on its shards and write the evaluation report.
demo: setup
	$(call instance,$(INSTANCE_DIR))
	$(PY) -m orchestration.check_config sample_world_main orchestration/presets/sample_world.yaml
	$(DAGSTER) asset materialize -m orchestration.definitions --select sample_world
	$(DAGSTER) job execute -m orchestration.definitions -j sample_world_main \
		-c orchestration/presets/sample_world.yaml --tags '$(SAMPLE_WORLD_SHARDS)'
	@echo "report: $$(ls -td data/evaluation_report/*/ | head -1)report.md"

# Paper Tab. 6(a) on the data of make demo: per variant packed sequences, a checkpoint and its fine-tuning, then one
# report.
ablation: setup
	$(call instance,$(INSTANCE_DIR))
	$(PY) -m orchestration.ablation_config orchestration/presets/sample_world.yaml orchestration/presets/ablation.yaml \
		> $(INSTANCE_DIR)/ablation.yaml
	$(PY) -m orchestration.check_config mmfs_ablation $(INSTANCE_DIR)/ablation.yaml
	$(DAGSTER) job execute -m orchestration.definitions -j mmfs_ablation \
		-c $(INSTANCE_DIR)/ablation.yaml --tags '$(ABLATION_VARIANTS)'
	@echo "report: $$(ls -td data/mmfs_ablation/*/ | head -1)report.md"

# The quality recipe in an instance and data root of its own (dagster_home/quality, data/quality).
QUALITY := WEFT_PRESET=sample_world_quality DAGSTER_HOME=$(INSTANCE_DIR)/quality
quality: setup
	$(call instance,$(INSTANCE_DIR)/quality)
	$(QUALITY) $(PY) -m orchestration.check_config sample_world_quality orchestration/presets/sample_world_quality.yaml
	$(QUALITY) $(VENV)/bin/dagster asset materialize -m orchestration.definitions --select sample_world
	$(QUALITY) $(VENV)/bin/dagster job execute -m orchestration.definitions -j sample_world_quality \
		-c orchestration/presets/sample_world_quality.yaml --tags "$$($(QUALITY) $(PY) -m orchestration.partition_range)"
	@echo "report: $$(ls -td data/quality/evaluation_report/*/ | head -1)report.md"

# Paper Tab. 6(a) on the quality recipe's data and settings (run make quality first): 16 visual tokens with MMFS, 16
# without, 64 without (the recipe's 256-token rows hold two images of 64, not of 128).
quality-ablation: setup
	$(call instance,$(INSTANCE_DIR)/quality)
	$(QUALITY) $(PY) -m orchestration.ablation_config orchestration/presets/sample_world_quality.yaml \
		--many-image-tokens 64 > $(INSTANCE_DIR)/quality/ablation.yaml
	$(QUALITY) $(PY) -m orchestration.check_config mmfs_ablation $(INSTANCE_DIR)/quality/ablation.yaml
	$(QUALITY) $(VENV)/bin/dagster job execute -m orchestration.definitions -j mmfs_ablation \
		-c $(INSTANCE_DIR)/quality/ablation.yaml --tags '$(ABLATION_VARIANTS)'
	@echo "report: $$(ls -td data/quality/mmfs_ablation/*/ | head -1)report.md"

ui: setup
	$(call instance,$(INSTANCE_DIR))
	$(DAGSTER) dev -h 127.0.0.1 -p $(UI_PORT) -w workspace.yaml

test: setup
	$(PY) -m pytest

$(SCALE_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,scale]'
	touch $(SCALE_STAMP)

# The scale-out tests (slow): they need PostgreSQL's server binaries, a Java runtime and chromium (Debian's postgresql,
# default-jre-headless, chromium; .ci/run installs what is missing).
test-scale: $(SCALE_STAMP)
	$(PY) -m pytest -m slow tests/test_scale_dagster.py tests/test_scale_download.py \
		"tests/test_train.py::test_two_cpu_processes_zero2_then_resume_in_one[two_nodes]" tests/test_scale_ui.py

# The MMFS ablation's job on the sample world's graph (slow: ~1 min on 2 idle cores, ~2 min on one busy one).
test-ablation: setup
	$(PY) -m pytest -m slow "tests/test_assets_graph.py::test_mmfs_ablation_packs_trains_finetunes_and_reports_every_variant_in_the_graph"

bench: setup
	$(PY) -m cuda_ops.bench
	$(PY) -m pipelines.bench
