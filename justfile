# sagahost developer recipes. The scripts they call work without `just` too.

# Run sagahost on the embedded default (127.0.0.1:8080, ./data)
serve *ARGS:
    ./scripts/serve {{ARGS}}

# Run the whole test suite
test *ARGS:
    ./scripts/test {{ARGS}}

# Build the plugins (wasm32-wasip2 components in plugins/target)
plugins:
    cd plugins && cargo build --release

# Lint: formatting and clippy with warnings as errors
lint:
    cargo fmt --all -- --check
    cargo clippy --locked --workspace --all-targets -- -D warnings

# What CI runs
ci:
    ./.ci/run
