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

demo: setup
	test -f $(DEMO)/synthvox/vox1_meta.csv || \
	    $(PY) -m avpgan synth --out $(DEMO)/synthvox --identities 48 --utterances-per-id 8 --faces-per-id 4 --seed 0
	$(PY) -m avpgan shards build --voxceleb $(DEMO)/synthvox/voxceleb1/wav --vggface $(DEMO)/synthvox/vggface \
	    --meta $(DEMO)/synthvox/vox1_meta.csv --out $(DEMO)/shards --config configs/tiny.yaml
	$(PY) -m avpgan shards check $(DEMO)/shards
	# training ends by exporting the bundle $(DEMO)/run/model.safetensors (as `avpgan export` does)
	$(PY) -m avpgan train --config configs/tiny.yaml data.shards=$(DEMO)/shards train.run_dir=$(DEMO)/run
	$(PY) -m avpgan evaluate $(DEMO)/run --shards $(DEMO)/shards --split test --seconds 2 4 \
	    --attributes $(DEMO)/synthvox/attributes.csv --out $(DEMO)/run/results.json
	$(PY) -m avpgan generate $(DEMO)/run/model.safetensors $$(ls -d $(DEMO)/synthvox/voxceleb1/wav/*/*/00001.wav | head -8) \
	    --out $(DEMO)/faces --grid
	@echo
	@echo "faces:       $(DEMO)/faces (grid.png) and training samples in $(DEMO)/run/samples"
	@echo "metrics:     $(DEMO)/run/results.json"
	@echo "MLflow run:  .venv/bin/mlflow ui --backend-store-uri sqlite:///$(DEMO)/run/mlflow.db  (then http://127.0.0.1:5000)"

test: setup
	# The SLURM tests start a real single-node cluster: slurm-wlm comes from Debian.
	command -v slurmctld >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null)
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO) runs/tiny
