# Two commands for a fresh machine: `make book` and `make test` (see README.md).
PY      := .venv/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
STAMP   := .venv/.installed

.PHONY: venv book check-book test test-lib test-notebooks test-book models clean

venv: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

book: venv
	.venv/bin/jupyter-book build . --path-output . -W -n --keep-going
	@# Sphinx copies _static/ only when some page changed: keep the book's CSS and JS current
	cp _static/*.css _static/*.js _build/html/_static/
	@echo "open _build/html/index.html"

test: test-lib test-notebooks test-book

test-lib: venv
	$(PY) -m pytest tests -q

# every chapter under the tiny profile; only cells marked NBVAL_CHECK_OUTPUT compare outputs
test-notebooks: venv
	SPECDEC_PROFILE=tiny $(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider chapters -q

# the built book as a reader meets it: no absolute paths, tracebacks, progress bars, empty widget
# cells, broken links, code lines over 95 characters, unrendered $math$ or leftover markers
# (tools/check_book.py); a few seconds
test-book: book
	$(PY) tools/check_book.py _build/html

# the same, plus headless-Chromium screenshots of every page (front matter and chapters, whole
# page in 2000 px tiles) in _build/screenshots (Debian: apt-get install -y chromium); look at them
# before publishing
check-book: book
	$(PY) tools/check_book.py _build/html --screenshots _build/screenshots

models: venv
	$(PY) -m specdec_lib.models fetch

clean:
	rm -rf _build .venv
