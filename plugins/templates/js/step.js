// {{name}}: a sagahost saga step in JavaScript.
//
// The host calls `execute` to run the step and `compensate` to undo it, each
// in a fresh instance: keep nothing in globals between calls, keep it in
// `state` (committed only if the call succeeds). The contract is
// `wit/step.wit`; in JavaScript, records are objects with camelCase fields
// (`ctx.sagaId`, `ctx.attempt`), a missing `option` is `undefined`,
// `list<u8>` is a Uint8Array, and a `result` is the return value (ok) or a
// thrown `{tag: 'retryable' | 'rejected', val: message}` (err). Throwing
// anything else traps: the attempt fails like a crash.
//
// There is no console, clock, timer or fetch here: log with `log`, and derive
// ids from the input and `ctx.sagaId`, never from time or random numbers.

import { get, set } from 'sagahost:plugin/state@0.2.0';
import { log } from 'sagahost:plugin/log@0.2.0';

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Runs the step. `input` is JSON: `{"input": ..., "steps": {...}, "config": {...}}`. */
export function execute(ctx, input) {
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

/** Undoes `execute`. `output` is its `done` JSON, or `null` if it never finished. */
export function compensate(ctx, _input, _output) {
  const saved = get(`done/${ctx.sagaId}`);
  log('info', `{{name}} compensate attempt ${ctx.attempt}: ${saved ? decoder.decode(saved) : 'nothing to undo'}`);
  return JSON.stringify({ ok: true });
}
