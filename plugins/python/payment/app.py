"""`payment` in Python: the second step of the built-in `order` saga.

The same step as `plugins/payment/src/lib.rs`, whose behaviour is part of the
product contract (SPEC §7), written for componentize-py:

- execute charges the order total, the sum of `quantity * unit_price_cents`
  (a total past 2**64 - 1 rejects with `order total overflows`). By payment
  token:
  - `tok_decline`: rejected, `card declined`;
  - `tok_flaky`: retryable (`payment gateway unavailable`) on attempts 1 and
    2, charges on attempt 3 and later;
  - `tok_3ds`: without a signal, waits for the signal `payment-confirmed` and
    writes nothing; once woken by it, charges;
  - anything else: charges.

  A charge writes state `charge/{order_id}` =
  `{"amount_cents":n,"currency":"USD","status":"charged"}` and outputs
  `{"amount_cents":n,"charge_id":"ch_{order_id}","currency":"USD"}`. A second
  execute for the same order writes nothing and returns the same output.
- compensate refunds a charge once (status `refunded`) and returns
  `{"refunded_cents":n}`, or `{"refunded_cents":0}` when nothing is charged
  (never charged, or already refunded).

The order id is the saga id. Malformed input rejects with
`invalid input: ...`; a stored charge that is not valid JSON fails retryably
with `state charge/{order_id} holds unexpected data: ...`, as the Rust SDK does.

Everything the step uses is imported here, at the top: componentize-py runs
this module once at build time and snapshots the interpreter, so nothing is
loaded from files at run time (a plugin has no files, and the host refuses the
filesystem imports a run-time import would need).
"""

import json
import re

import wit_world
from componentize_py_types import Err
from wit_world.imports import log, state
from wit_world.imports.sagahost_plugin_types import (
    CallContext,
    StepError,
    StepError_Rejected,
    StepError_Retryable,
    StepOutcome,
    StepOutcome_Done,
    StepOutcome_Wait,
    WaitRequest,
)

# The name this step logs under, like the Rust plugin.
STEP = "payment"
# Status of a charge that holds the money.
CHARGED = "charged"
# Status of a charge that was given back.
REFUNDED = "refunded"
# The signal a `tok_3ds` payment waits for.
CONFIRMATION_SIGNAL = "payment-confirmed"
# Attempts before which a `tok_flaky` payment fails retryably.
FLAKY_FAILURES = 2
# The largest total the Rust plugin (a u64) can hold.
U64_MAX = 2**64 - 1
# The deepest JSON nesting accepted, serde_json's limit. CPython's parser recurses in C per
# level, and the wasm stack runs out (a trap) long before Python's RecursionError would fire.
MAX_DEPTH = 128
# A JSON string, to skip brackets inside strings when measuring the nesting.
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
BRACKETS = re.compile(r"[\[\]{}]")


class StepFailure(Exception):
    """A `step-error` raised inside the step's logic, turned into `Err` at the export."""

    def __init__(self, error: StepError):
        super().__init__(error.value)
        self.error = error


def rejected(message: str) -> StepFailure:
    return StepFailure(StepError_Rejected(message))


def invalid(reason: str) -> StepFailure:
    """A rejection for malformed input: retrying cannot fix it."""
    return rejected(f"invalid input: {reason}")


def to_json(value) -> str:
    """Compact JSON, as serde_json writes it (keys are given in sorted order)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _no_constants(name: str):
    # Python's json accepts NaN and Infinity; JSON (and serde_json) does not.
    raise ValueError(f"{name} is not valid JSON")


def too_deep(text: str) -> bool:
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    depth = 0
    for bracket in BRACKETS.findall(JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


def parse_json(text):
    if too_deep(text):
        raise ValueError(f"recursion limit exceeded (JSON nested deeper than {MAX_DEPTH})")
    return json.loads(text, parse_constant=_no_constants)


def is_u64(value) -> bool:
    # bool is an int in Python; JSON true is not a number.
    return type(value) is int and 0 <= value <= U64_MAX


def parse_order(raw_input: str):
    """The part of `input.input` this step reads: (items, currency, token)."""
    try:
        document = parse_json(raw_input)
    except (ValueError, RecursionError) as e:
        raise invalid(str(e))
    if not isinstance(document, dict):
        raise invalid("expected an object with `input`, `steps` and `config`")
    if "input" not in document:
        raise invalid("missing field `input`")
    if not isinstance(document.get("steps", {}), dict):
        raise invalid("`steps` must be an object")
    # Absent or null is no config; anything else must be an object, as the Rust SDK and the
    # JavaScript step decide ([], 0, "" and false are malformed, not empty).
    config = document.get("config")
    if config is not None and not isinstance(config, dict):
        raise invalid("`config` must be an object or null")
    order = document["input"]
    if not isinstance(order, dict):
        raise invalid("`input` must be an object")
    for field in ("items", "currency", "payment"):
        if field not in order:
            raise invalid(f"missing field `{field}`")
    items = order["items"]
    if not isinstance(items, list):
        raise invalid("`items` must be an array")
    prices = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise invalid(f"items[{i}] must be an object")
        for field in ("quantity", "unit_price_cents"):
            if field not in item:
                raise invalid(f"items[{i}]: missing field `{field}`")
            if not is_u64(item[field]):
                raise invalid(f"items[{i}].{field} must be an integer from 0 to {U64_MAX}")
        prices.append((item["quantity"], item["unit_price_cents"]))
    currency = order["currency"]
    if not isinstance(currency, str):
        raise invalid("`currency` must be a string")
    payment = order["payment"]
    if not isinstance(payment, dict) or "token" not in payment:
        raise invalid("`payment` must be an object with a `token`")
    token = payment["token"]
    if not isinstance(token, str):
        raise invalid("`payment.token` must be a string")
    return prices, currency, token


def order_total(prices):
    """The order total in cents, or None if it does not fit in a u64."""
    total = 0
    for quantity, unit_price_cents in prices:
        # Python ints do not overflow; check every step as checked_mul/checked_add do.
        line = quantity * unit_price_cents
        total += line
        if line > U64_MAX or total > U64_MAX:
            return None
    return total


def charge_key(order_id: str) -> str:
    return f"charge/{order_id}"


def load_charge(key: str):
    """The charge under `key`, or None; retryable if the bytes are not a charge."""
    raw = state.get(key)
    if raw is None:
        return None
    try:
        charge = parse_json(bytes(raw).decode("utf-8"))
        if not (
            isinstance(charge, dict)
            and is_u64(charge.get("amount_cents"))
            and isinstance(charge.get("currency"), str)
            and isinstance(charge.get("status"), str)
        ):
            raise ValueError("expected amount_cents, currency and status")
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
        raise StepFailure(StepError_Retryable(f"state {key} holds unexpected data: {e}"))
    return charge


def store_charge(key: str, amount_cents: int, currency: str, status: str) -> None:
    record = {"amount_cents": amount_cents, "currency": currency, "status": status}
    state.set(key, to_json(record).encode("utf-8"))


def output(order_id: str, charge) -> str:
    return to_json(
        {
            "amount_cents": charge["amount_cents"],
            "charge_id": f"ch_{order_id}",
            "currency": charge["currency"],
        }
    )


def execute(ctx: CallContext, raw_input: str) -> StepOutcome:
    order_id = ctx.saga_id
    prices, currency, token = parse_order(raw_input)

    key = charge_key(order_id)
    existing = load_charge(key)
    if existing is not None:
        return StepOutcome_Done(output(order_id, existing))
    amount_cents = order_total(prices)
    if amount_cents is None:
        raise rejected("order total overflows")
    if token == "tok_decline":
        raise rejected("card declined")
    if token == "tok_flaky" and ctx.attempt <= FLAKY_FAILURES:
        raise StepFailure(StepError_Retryable("payment gateway unavailable"))
    if token == "tok_3ds" and ctx.signal is None:
        return StepOutcome_Wait(WaitRequest(delay_ms=None, signal=CONFIRMATION_SIGNAL))
    store_charge(key, amount_cents, currency, CHARGED)
    return StepOutcome_Done(
        output(order_id, {"amount_cents": amount_cents, "currency": currency})
    )


def compensate(ctx: CallContext) -> str:
    key = charge_key(ctx.saga_id)
    charge = load_charge(key)
    refunded_cents = 0
    if charge is not None and charge["status"] == CHARGED:
        store_charge(key, charge["amount_cents"], charge["currency"], REFUNDED)
        refunded_cents = charge["amount_cents"]
    return to_json({"refunded_cents": refunded_cents})


def describe_error(error: StepError) -> str:
    kind = "retryable" if isinstance(error, StepError_Retryable) else "rejected"
    return f"{kind}: {error.value}"


def describe_outcome(outcome: StepOutcome) -> str:
    if isinstance(outcome, StepOutcome_Done):
        return f"done {outcome.value}"
    wait = outcome.value
    if wait.signal is not None and wait.delay_ms is not None:
        return f"wait for signal {wait.signal} or {wait.delay_ms} ms"
    if wait.signal is not None:
        return f"wait for signal {wait.signal}"
    if wait.delay_ms is not None:
        return f"wait {wait.delay_ms} ms"
    return "wait"


class WitWorld(wit_world.WitWorld):
    """The component's exports. Each logs one line, as the Rust SDK's `log::execution` does."""

    def execute(self, ctx: CallContext, input: str) -> StepOutcome:
        try:
            outcome = execute(ctx, input)
        except StepFailure as failure:
            log.log(log.Level.INFO, f"{STEP} execute attempt {ctx.attempt}: {describe_error(failure.error)}")
            raise Err(failure.error)
        log.log(log.Level.INFO, f"{STEP} execute attempt {ctx.attempt}: {describe_outcome(outcome)}")
        return outcome

    def compensate(self, ctx: CallContext, input: str, output: str) -> str:
        try:
            result = compensate(ctx)
        except StepFailure as failure:
            log.log(log.Level.INFO, f"{STEP} compensate attempt {ctx.attempt}: {describe_error(failure.error)}")
            raise Err(failure.error)
        log.log(log.Level.INFO, f"{STEP} compensate attempt {ctx.attempt}: ok {result}")
        return result
