// {{name}}: a sagahost saga step in JavaScript.
//
// The host calls `execute` to run the step and `compensate` to undo it, each
// in a fresh instance: keep nothing in globals between calls, keep it in
// `state` (committed only if the call succeeds). The contract is
// `wit/step.wit`; in JavaScript, records are objects with camelCase fields
// (`ctx.sagaId`, `ctx.attempt`), a missing `option` is `undefined`,
// `list<u8>` is a Uint8Array, and a `result` is the return value (ok) or a
// thrown `{tag: 'retryable' | 'rejected', val: message}` (err). Anything else
// thrown would trap, leaving only `plugin panicked (wasm trap: unreachable)`
// as the step's error: `guarded` below turns it into a `retryable` error that
// names the exception instead (and logs its stack).
//
// There is no console, clock, timer or fetch here: log with `log`, and derive
// ids from the input and `ctx.sagaId`, never from time or random numbers.

// `state` also has `scan(prefix, after, limit)` and `delete(key)`. `delete` is
// a reserved word, so import it under another name,
// `import { delete as del } from 'sagahost:plugin/state@0.2.0'`, or import the
// whole interface, `import * as state from 'sagahost:plugin/state@0.2.0'`,
// and call `state.delete(key)`.
import { get, set } from 'sagahost:plugin/state@0.2.0';
import { log } from 'sagahost:plugin/log@0.2.0';

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Runs the step. `input` is JSON: `{"input": ..., "steps": {...}, "config": {...}}`. */
function run(ctx, input) {
  let step;
  try {
    step = JSON.parse(input);
  } catch (e) {
    // A rejection is final: the saga compensates. Use `retryable` for transient failures.
    throw { tag: 'rejected', val: `invalid input: ${e.message}` };
  }
  const key = `done/${ctx.sagaId}`;
  // A retry may run execute again: do the effect once, remember it in state.
  if (get(key) === undefined) {
    set(key, encoder.encode(JSON.stringify({ input: step.input ?? null })));
    log('info', `{{name}} execute attempt ${ctx.attempt}: done`);
  }
  // `done` carries the step's output JSON; `{tag: 'wait', val: {delayMs, signal}}` parks it.
  return { tag: 'done', val: JSON.stringify({ ok: true, saga_id: ctx.sagaId }) };
}

/** Undoes `run`. `output` is its `done` JSON, or `null` if it never finished. */
function undo(ctx, _input, _output) {
  const saved = get(`done/${ctx.sagaId}`);
  log('info', `{{name}} compensate attempt ${ctx.attempt}: ${saved ? decoder.decode(saved) : 'nothing to undo'}`);
  return JSON.stringify({ ok: true });
}

/** What an unexpected exception was, in one line. */
function describe(e) {
  if (e instanceof Error) return `${e.name}: ${e.message}`;
  try {
    return typeof e === 'object' && e !== null ? JSON.stringify(e) : String(e);
  } catch {
    return Object.prototype.toString.call(e);
  }
}

/**
 * Runs `call`. A thrown step error (`{tag: 'retryable' | 'rejected', val}`)
 * goes out as it is; any other exception (a bug: a TypeError, a SyntaxError
 * from JSON.parse of unexpected state) is logged with its stack and becomes a
 * `retryable` error naming it, which the step's `last_error` shows.
 */
function guarded(phase, ctx, call) {
  try {
    return call();
  } catch (e) {
    if (typeof e === 'object' && e !== null && (e.tag === 'retryable' || e.tag === 'rejected')) throw e;
    const message = `unexpected exception in ${phase}: ${describe(e)}`;
    const stack = e instanceof Error && e.stack ? `; stack: ${e.stack}` : '';
    log('error', `{{name}} ${phase} attempt ${ctx.attempt}: ${message}${stack}`);
    throw { tag: 'retryable', val: message };
  }
}

export function execute(ctx, input) {
  return guarded('execute', ctx, () => run(ctx, input));
}

export function compensate(ctx, input, output) {
  return guarded('compensate', ctx, () => undo(ctx, input, output));
}
