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
	$(PY) -m avpgan synth --out $(DEMO)/synthvox --identities 48 --utterances-per-id 8 --faces-per-id 4 --seed 0
	$(PY) -m avpgan shards build --voxceleb $(DEMO)/synthvox/voxceleb1/wav --vggface $(DEMO)/synthvox/vggface \
	    --meta $(DEMO)/synthvox/vox1_meta.csv --out $(DEMO)/shards --config configs/tiny.yaml
	$(PY) -m avpgan shards check $(DEMO)/shards

test: setup
	# The SLURM tests start a real single-node cluster: slurm-wlm comes from Debian.
	command -v slurmctld >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null)
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO) runs/tiny
