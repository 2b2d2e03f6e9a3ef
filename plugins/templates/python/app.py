"""{{name}}: a sagahost saga step in Python, built with componentize-py.

componentize-py runs this module once at build time and snapshots the
interpreter into the component. A plugin has no files, clock or network at run
time (the build stubs them out), so import everything you need here, at the top:
an `import` inside a function fails when the step runs. `print` fails too; use
`log.log` instead.

A step fails with `raise Err(StepError_Rejected(...))` or
`raise Err(StepError_Retryable(...))`. Any other exception would trap, leaving
only `plugin panicked (wasm trap: unreachable)` as the step's error: `guarded`
below turns it into a retryable error that names the exception instead.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import log, state
from wit_world.imports.sagahost_plugin_types import (
    CallContext,
    StepError_Rejected,
    StepError_Retryable,
    StepOutcome,
    StepOutcome_Done,
)


def execute(ctx: CallContext, input: str) -> StepOutcome:
    # `input` is JSON: {"input": <saga input>, "steps": {<earlier step>: <output>}, "config": {...}}.
    try:
        saga_input = json.loads(input)["input"]
    except (ValueError, KeyError, TypeError) as e:
        # A rejection fails the saga (it compensates); StepError_Retryable retries later.
        raise Err(StepError_Rejected(f"invalid input: {e}"))

    # State is a private key-value store; writes commit only if the call succeeds.
    # Execute may run again for the same saga (a retry, a crash): make it idempotent.
    key = "seen/" + ctx.saga_id
    if state.get(key) is None:
        state.set(key, json.dumps(saga_input).encode())
        log.log(log.Level.INFO, f"{ctx.step}: first run for {ctx.saga_id}")

    # Done: this JSON is the step's output, which later steps and compensate receive.
    return StepOutcome_Done(json.dumps({"ok": True, "saga_id": ctx.saga_id}, separators=(",", ":")))


def compensate(ctx: CallContext, input: str, output: str) -> str:
    # Undo what execute did; `output` is its output JSON, or "null" if it never finished.
    state.delete("seen/" + ctx.saga_id)
    log.log(log.Level.INFO, f"{ctx.step}: undone for {ctx.saga_id}")
    return "{}"


def guarded(phase: str, ctx: CallContext, call):
    """Runs `call()`. A step error (`raise Err(...)`) goes out as it is; any other
    exception (a bug: a KeyError, a TypeError) is logged and becomes a retryable
    error naming it, which the step's `last_error` shows."""
    try:
        return call()
    except Err:
        raise
    except Exception as e:
        message = f"unexpected exception in {phase}: {type(e).__name__}: {e}"
        # Where it was raised. (The traceback module would read the source files,
        # which a plugin does not have.)
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            message += f" (line {tb.tb_lineno}, in {tb.tb_frame.f_code.co_name})"
        log.log(log.Level.ERROR, f"{ctx.step} {phase} attempt {ctx.attempt}: {message}")
        raise Err(StepError_Retryable(message))


class WitWorld(wit_world.WitWorld):
    """The component's exports: the functions above, guarded."""

    def execute(self, ctx: CallContext, input: str) -> StepOutcome:
        return guarded("execute", ctx, lambda: execute(ctx, input))

    def compensate(self, ctx: CallContext, input: str, output: str) -> str:
        return guarded("compensate", ctx, lambda: compensate(ctx, input, output))
