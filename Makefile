# Two entry points (see README): `make demo` runs the whole job on SynthVox, `make test` the suite.
# Both create .venv first; nothing needs to be installed by hand.
PY := .venv/bin/python
DEMO := data/demo

.PHONY: setup demo test clean-demo

setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# torch pinned to the CPU build that this machine kind keeps on disk; a GPU box brings its own.
	.venv/bin/pip install -q "torch>=2.5,<2.14" -e ".[dev]"
	touch $@

# The demo's speakers: the first 8 test identities of SynthVox (never seen in training).
DEMO_SPEAKERS = awk -F, '$$4 == "test" {print $$2 ":" $$3}' $(DEMO)/synthvox/attributes.csv | head -8

demo: setup
	test -f $(DEMO)/synthvox/vox1_meta.csv || \
	    $(PY) -m avpgan synth --out $(DEMO)/synthvox --identities 200 --utterances-per-id 8 --faces-per-id 4 --seed 0 --workers 2
	$(PY) -m avpgan shards build --voxceleb $(DEMO)/synthvox/voxceleb1/wav --vggface $(DEMO)/synthvox/vggface \
	    --meta $(DEMO)/synthvox/vox1_meta.csv --out $(DEMO)/shards --config configs/tiny.yaml --workers 2
	$(PY) -m avpgan shards check $(DEMO)/shards
	# training builds the voice-embedding bank before the gan stage and ends by exporting the
	# bundle $(DEMO)/run/model.safetensors (as `avpgan export` does)
	$(PY) -m avpgan train --config configs/tiny.yaml data.shards=$(DEMO)/shards train.run_dir=$(DEMO)/run
	$(PY) -m avpgan evaluate $(DEMO)/run --shards $(DEMO)/shards --split test --seconds 4 8 \
	    --attributes $(DEMO)/synthvox/attributes.csv --out $(DEMO)/run/results.json
	voices=; real=; for s in $$($(DEMO_SPEAKERS)); do \
	    voices="$$voices $$(ls $(DEMO)/synthvox/voxceleb1/wav/$${s%%:*}/*/*.wav | head -1)"; \
	    real="$$real $$(ls $(DEMO)/synthvox/vggface/$${s#*:}/*.jpg | head -1)"; done; \
	$(PY) -m avpgan generate $(DEMO)/run/model.safetensors $$voices --real $$real --no-restore --out $(DEMO)/faces --grid
	@echo
	@echo "faces:       $(DEMO)/faces/grid.png (real faces of 8 unseen speakers above the faces made from their voices)"
	@echo "             training samples (train and validation voices) in $(DEMO)/run/samples"
	@echo "metrics:     $(DEMO)/run/results.json"
	@echo "MLflow run:  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui --backend-store-uri sqlite:///$(DEMO)/run/mlflow.db  (then http://127.0.0.1:5000)"

test: setup
	# The SLURM tests start a real single-node cluster: slurm-wlm comes from Debian.
	command -v slurmctld >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null)
	# tests/test_serve.py drives the page of `avpgan serve` in Debian's headless chromium (about a minute).
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || (apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO) runs/tiny
