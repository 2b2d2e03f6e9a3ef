// `payment`, written in JavaScript: the same step as the Rust
// `plugins/payment` (SPEC §7), built with componentize-js (`../build`).
// Its behaviour is part of the product contract and must stay identical to
// the Rust crate's:
//
// - execute charges the order total, the sum of `quantity * unit_price_cents`
//   (a total past u64 rejects with `order total overflows`). By payment token:
//   - `tok_decline`: rejected, `card declined`;
//   - `tok_flaky`: retryable (`payment gateway unavailable`) on attempts 1
//     and 2, charges on attempt 3 and later;
//   - `tok_3ds`: without a signal, waits for the signal `payment-confirmed`
//     and writes nothing; once woken by it, charges;
//   - anything else: charges.
//
//   A charge writes state `charge/{order_id}` =
//   `{"amount_cents":n,"currency":"USD","status":"charged"}` and outputs
//   `{"amount_cents":n,"charge_id":"ch_{order_id}","currency":"USD"}`.
//   A second execute for the same order writes nothing and returns the same
//   output.
// - compensate refunds a charge once (status `refunded`) and returns
//   `{"refunded_cents":n}`, or `{"refunded_cents":0}` when nothing is
//   charged (never charged, or already refunded).
//
// The order id is the saga id. Malformed input rejects with
// `invalid input: ...` (retrying cannot fix it).
//
// How the WIT maps to JavaScript (componentize-js): records are objects with
// camelCase fields (`ctx.sagaId`), `option` is the value or `undefined`,
// `list<u8>` is a Uint8Array, a variant is `{tag, val}`, and a `result` is
// the return value (ok) or a thrown `{tag, val}` (err). Anything else thrown
// traps the instance, which the host counts as a failed attempt, like a
// panic in a Rust step.
//
// Amounts are BigInt from end to end: JSON numbers are read from their source
// text and written back verbatim, so a total up to 2^64 - 1 is exact.

import { get, set } from 'sagahost:plugin/state@0.2.0';
import { log } from 'sagahost:plugin/log@0.2.0';

/** Status of a charge that holds the money. */
const CHARGED = 'charged';
/** Status of a charge that was given back. */
const REFUNDED = 'refunded';
/** The signal a `tok_3ds` payment waits for. */
const CONFIRMATION_SIGNAL = 'payment-confirmed';
/** Attempts before which a `tok_flaky` payment fails retryably. */
const FLAKY_FAILURES = 2;
/** The largest amount, as in the Rust step's `u64`. */
const U64_MAX = (1n << 64n) - 1n;

/** A business rejection: `execute` is not retried. */
const rejected = (message) => ({ tag: 'rejected', val: message });
/** A transient failure: the host retries later. */
const retryable = (message) => ({ tag: 'retryable', val: message });
/** A rejection for malformed input (the Rust SDK's `input::invalid`). */
const invalid = (reason) => rejected(`invalid input: ${reason}`);

/**
 * Parses JSON keeping every integer exact: integers become BigInt (read from
 * their source text), other numbers stay Numbers. Throws a SyntaxError.
 */
function parseExact(text) {
  return JSON.parse(text, (_key, value, context) =>
    typeof value === 'number' && /^-?\d+$/.test(context?.source ?? '')
      ? BigInt(context.source)
      : value,
  );
}

/** Serializes like JSON.stringify, writing BigInt values as JSON integers. */
function toJson(value) {
  return JSON.stringify(value, (_key, v) => (typeof v === 'bigint' ? JSON.rawJSON(v.toString()) : v));
}

const isObject = (v) => typeof v === 'object' && v !== null && !Array.isArray(v);

/** An integer field in 0..=u64::MAX, as a BigInt, or throws `invalid input`. */
function u64Field(obj, field, path) {
  const v = obj[field];
  if (v === undefined) throw invalid(`missing field \`${path}.${field}\``);
  if (typeof v !== 'bigint' || v < 0n || v > U64_MAX) {
    throw invalid(`${path}.${field} must be an integer from 0 to ${U64_MAX}`);
  }
  return v;
}

/** A string field, or throws `invalid input`. */
function stringField(obj, field, path) {
  const v = obj[field];
  if (v === undefined) throw invalid(`missing field \`${path}.${field}\``);
  if (typeof v !== 'string') throw invalid(`${path}.${field} must be a string`);
  return v;
}

/**
 * The order this step reads from the `input` argument
 * (`{"input": <order>, "steps": {...}, "config": {...}}`):
 * `{items: [{quantity, unitPriceCents}], currency, token}`.
 */
function parseOrder(raw) {
  let step;
  try {
    step = parseExact(raw);
  } catch (e) {
    throw invalid(e.message);
  }
  if (!isObject(step)) throw invalid('expected an object');
  if (step.steps !== undefined && !isObject(step.steps)) throw invalid('steps must be an object');
  if (step.config !== undefined && step.config !== null && !isObject(step.config)) {
    throw invalid('config must be an object');
  }
  const order = step.input;
  if (order === undefined) throw invalid('missing field `input`');
  if (!isObject(order)) throw invalid('input must be an object');
  if (order.items === undefined) throw invalid('missing field `input.items`');
  if (!Array.isArray(order.items)) throw invalid('input.items must be an array');
  const items = order.items.map((item, i) => {
    const path = `input.items[${i}]`;
    if (!isObject(item)) throw invalid(`${path} must be an object`);
    return {
      quantity: u64Field(item, 'quantity', path),
      unitPriceCents: u64Field(item, 'unit_price_cents', path),
    };
  });
  const currency = stringField(order, 'currency', 'input');
  if (order.payment === undefined) throw invalid('missing field `input.payment`');
  if (!isObject(order.payment)) throw invalid('input.payment must be an object');
  const token = stringField(order.payment, 'token', 'input.payment');
  return { items, currency, token };
}

/** The order total in cents, or `undefined` if it does not fit in a u64. */
function orderTotal(items) {
  let total = 0n;
  for (const { quantity, unitPriceCents } of items) {
    total += quantity * unitPriceCents;
    if (total > U64_MAX) return undefined;
  }
  return total;
}

/** The state key of an order's charge. */
const chargeKey = (orderId) => `charge/${orderId}`;

/** Reads the charge record under `key`, `undefined` if absent. */
function readCharge(key) {
  const bytes = get(key);
  if (bytes === undefined) return undefined;
  let charge;
  try {
    charge = parseExact(new TextDecoder().decode(bytes));
  } catch (e) {
    throw retryable(`state ${key} holds unexpected data: ${e.message}`);
  }
  const ok =
    isObject(charge) &&
    typeof charge.amount_cents === 'bigint' &&
    charge.amount_cents >= 0n &&
    charge.amount_cents <= U64_MAX &&
    typeof charge.currency === 'string' &&
    typeof charge.status === 'string';
  if (!ok) throw retryable(`state ${key} holds unexpected data: not a charge record`);
  return charge;
}

/** Writes the charge record, fields in the Rust step's order. */
function writeCharge(key, { amount_cents, currency, status }) {
  set(key, new TextEncoder().encode(toJson({ amount_cents, currency, status })));
}

/** The execute output for a charge (keys sorted, as serde_json writes them). */
const output = (orderId, charge) =>
  toJson({ amount_cents: charge.amount_cents, charge_id: `ch_${orderId}`, currency: charge.currency });

/** Charges the order (see the top of the file). */
function charge(ctx, rawInput) {
  const orderId = ctx.sagaId;
  const order = parseOrder(rawInput);

  const key = chargeKey(orderId);
  const existing = readCharge(key);
  if (existing !== undefined) return { tag: 'done', val: output(orderId, existing) };

  const amountCents = orderTotal(order.items);
  if (amountCents === undefined) throw rejected('order total overflows');
  if (order.token === 'tok_decline') throw rejected('card declined');
  if (order.token === 'tok_flaky' && ctx.attempt <= FLAKY_FAILURES) {
    throw retryable('payment gateway unavailable');
  }
  if (order.token === 'tok_3ds' && ctx.signal === undefined) {
    return { tag: 'wait', val: { delayMs: undefined, signal: CONFIRMATION_SIGNAL } };
  }
  const record = { amount_cents: amountCents, currency: order.currency, status: CHARGED };
  writeCharge(key, record);
  return { tag: 'done', val: output(orderId, record) };
}

/** Refunds the order's charge, if it holds (see the top of the file). */
function refund(ctx) {
  const key = chargeKey(ctx.sagaId);
  const existing = readCharge(key);
  let refundedCents = 0n;
  if (existing !== undefined && existing.status === CHARGED) {
    writeCharge(key, { ...existing, status: REFUNDED });
    refundedCents = existing.amount_cents;
  }
  return toJson({ refunded_cents: refundedCents });
}

/**
 * Runs `call`, logs `payment {phase} attempt {n}: {result}` as the Rust SDK's
 * `log::execution` / `log::compensation` do, and hands the result back (or
 * rethrows the step error). An unexpected exception is logged at `error` and
 * rethrown, so it traps.
 */
function logged(phase, ctx, describe, call) {
  const prefix = `payment ${phase} attempt ${ctx.attempt}`;
  let result;
  try {
    result = call();
  } catch (e) {
    if (isObject(e) && (e.tag === 'retryable' || e.tag === 'rejected')) {
      log('info', `${prefix}: ${e.tag}: ${e.val}`);
    } else {
      log('error', `${prefix}: unexpected exception: ${e?.stack ?? e}`);
    }
    throw e;
  }
  log('info', `${prefix}: ${describe(result)}`);
  return result;
}

export function execute(ctx, input) {
  return logged('execute', ctx, (r) => (r.tag === 'done' ? `done ${r.val}` : `wait for signal ${r.val.signal}`), () =>
    charge(ctx, input),
  );
}

export function compensate(ctx, _input, _output) {
  return logged('compensate', ctx, (r) => `ok ${r}`, () => refund(ctx));
}
