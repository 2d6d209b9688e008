# Sourced by scripts: create .venv and install kvstore with its dev dependencies when missing or
# when pyproject.toml changed since the last install. pip's chatter goes to .venv/install.log.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    echo "setting up .venv (log: .venv/install.log) ..." >&2
    if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e ".[dev]"; } \
            > .venv/install.log 2>&1; then
        cat .venv/install.log >&2
        echo "installing kvstore into .venv failed (log above)" >&2
        exit 1
    fi
    touch .venv/.installed
fi
