# Two entry points, as the README says: `make serve` and `make test`. Both set up .venv first.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: serve test lint

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .  # `import loom` from any folder with .venv's python
	touch $(STAMP)

serve: $(STAMP)
	$(PY) main.py serve

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	.venv/bin/ruff check .
