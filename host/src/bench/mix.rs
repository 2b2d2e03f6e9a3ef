//! What the load generator sends: the demo triggers of SPEC §7, their expected outcomes, and a
//! weighted mix of them drawn deterministically from a seed.
//!
//! Each trigger is the SPEC §5.2 example order with the one field that makes the demo plugins
//! (or, for `order-http`, the demo services) behave a certain way. The bodies are serialised
//! once at start-up and shared: sending one costs a reference count, not a JSON encoding.
//!
//! The draw for the n-th saga is a pure function of (seed, n), not a shared random generator:
//! concurrent clients need no lock to draw, and the same seed sends the same sequence of
//! triggers whatever the interleaving, so two runs of one mix are comparable.

use std::fmt;

use bytes::Bytes;

/// A demo trigger: one kind of saga the generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Trigger {
    /// `tok_visa`: every step succeeds; the saga ends COMPLETED.
    Complete,
    /// `ship_to.country` `XX`: the last step is rejected, so payment is refunded and inventory
    /// released (the longest compensation); the saga ends CANCELLED.
    Compensate,
    /// `tok_decline`: payment is rejected and inventory released; CANCELLED.
    Decline,
    /// A SKU starting with `OOS-`: the first step is rejected, nothing to compensate; CANCELLED.
    OutOfStock,
    /// `tok_flaky`: payment fails retryably twice, then succeeds after its backoff; COMPLETED.
    Flaky,
}

/// The status a saga reaches when it ends as its trigger says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    Completed,
    Cancelled,
}

impl Expected {
    /// The saga status the API reports (SPEC §1).
    pub fn status(self) -> &'static str {
        match self {
            Expected::Completed => "COMPLETED",
            Expected::Cancelled => "CANCELLED",
        }
    }
}

impl Trigger {
    /// Every trigger, in the order reports list them.
    pub const ALL: [Trigger; 5] =
        [Trigger::Complete, Trigger::Compensate, Trigger::Decline, Trigger::OutOfStock, Trigger::Flaky];

    /// The name used in `--mix` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Complete => "complete",
            Trigger::Compensate => "compensate",
            Trigger::Decline => "decline",
            Trigger::OutOfStock => "out-of-stock",
            Trigger::Flaky => "flaky",
        }
    }

    /// Its position in [`Trigger::ALL`].
    pub fn index(self) -> usize {
        Trigger::ALL.iter().position(|t| *t == self).expect("every trigger is in ALL")
    }

    pub fn expected(self) -> Expected {
        match self {
            Trigger::Complete | Trigger::Flaky => Expected::Completed,
            Trigger::Compensate | Trigger::Decline | Trigger::OutOfStock => Expected::Cancelled,
        }
    }

    /// The request body: the SPEC §5.2 example order, changed where the trigger says.
    pub fn body(self) -> serde_json::Value {
        let (token, sku, country) = match self {
            Trigger::Complete => ("tok_visa", "SKU-1", "US"),
            Trigger::Compensate => ("tok_visa", "SKU-1", "XX"),
            Trigger::Decline => ("tok_decline", "SKU-1", "US"),
            Trigger::OutOfStock => ("tok_visa", "OOS-1", "US"),
            Trigger::Flaky => ("tok_flaky", "SKU-1", "US"),
        };
        serde_json::json!({
            "customer_id": "c-42",
            "items": [{"sku": sku, "quantity": 2, "unit_price_cents": 1250}],
            "currency": "USD",
            "payment": {"token": token},
            "ship_to": {"name": "Ada", "line1": "1 Main St", "city": "Springfield",
                        "postal_code": "12345", "country": country}
        })
    }

    fn parse(name: &str) -> Option<Trigger> {
        Trigger::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A weighted mix of triggers, e.g. `complete=90,compensate=10`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    /// `(trigger, weight)`, weights > 0, each trigger once, in the order given.
    parts: Vec<(Trigger, u32)>,
    total: u64,
}

impl Default for Mix {
    /// 90% orders that complete, 10% that are compensated.
    fn default() -> Mix {
        Mix::parse("complete=90,compensate=10").expect("the default mix parses")
    }
}

impl Mix {
    /// Parses `name=weight[,name=weight...]`. Weights are relative (they need not add up to 100).
    pub fn parse(spec: &str) -> Result<Mix, String> {
        let mut parts: Vec<(Trigger, u32)> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part.split_once('=').ok_or_else(|| format!("expected NAME=WEIGHT, got '{part}'"))?;
            let trigger = Trigger::parse(name.trim()).ok_or_else(|| {
                let known: Vec<_> = Trigger::ALL.iter().map(|t| t.name()).collect();
                format!("unknown trigger '{}'; use one of {}", name.trim(), known.join(", "))
            })?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("the weight of {trigger} must be a whole number, got '{}'", weight.trim()))?;
            if parts.iter().any(|(t, _)| *t == trigger) {
                return Err(format!("{trigger} is named twice; give each trigger once"));
            }
            if weight > 0 {
                parts.push((trigger, weight));
            }
        }
        let total: u64 = parts.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return Err("the mix sends nothing; give at least one trigger a weight above 0".to_owned());
        }
        Ok(Mix { parts, total })
    }

    /// The trigger of the `n`-th saga under `seed`.
    pub fn pick(&self, seed: u64, n: u64) -> Trigger {
        let mut r = splitmix64(seed ^ splitmix64(n)) % self.total;
        for (trigger, weight) in &self.parts {
            let w = u64::from(*weight);
            if r < w {
                return *trigger;
            }
            r -= w;
        }
        unreachable!("r < total, the sum of the weights")
    }

    /// The triggers with a weight, in the order given.
    pub fn triggers(&self) -> impl Iterator<Item = Trigger> + '_ {
        self.parts.iter().map(|(t, _)| *t)
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.parts.iter().map(|(t, w)| format!("{t}={w}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// The bodies of every trigger, serialised once.
#[derive(Clone)]
pub struct Bodies(Vec<Bytes>);

impl Bodies {
    pub fn new() -> Bodies {
        Bodies(Trigger::ALL.iter().map(|t| Bytes::from(t.body().to_string())).collect())
    }

    /// The body of `trigger`: a cheap clone of shared bytes.
    pub fn get(&self, trigger: Trigger) -> Bytes {
        self.0[trigger.index()].clone()
    }
}

impl Default for Bodies {
    fn default() -> Bodies {
        Bodies::new()
    }
}

/// SplitMix64's finaliser: a fast, well-mixed hash of a counter (Steele, Lea and Flood 2014).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_mix_is_ninety_ten() {
        let mix = Mix::default();
        assert_eq!(mix.to_string(), "complete=90,compensate=10");
        let mut counts = [0u32; 5];
        for n in 0..100_000 {
            counts[mix.pick(7, n).index()] += 1;
        }
        // 10% of 100,000 is 10,000; a fair draw stays well within 3%.
        assert!((9_700..=10_300).contains(&counts[Trigger::Compensate.index()]), "{counts:?}");
        assert_eq!(counts[Trigger::Complete.index()] + counts[Trigger::Compensate.index()], 100_000);
    }

    #[test]
    fn the_draw_is_a_function_of_seed_and_index() {
        let mix = Mix::parse("complete=1,decline=1,flaky=1").unwrap();
        let a: Vec<_> = (0..1000).map(|n| mix.pick(42, n)).collect();
        let b: Vec<_> = (0..1000).map(|n| mix.pick(42, n)).collect();
        assert_eq!(a, b, "same seed, same sequence");
        // Drawn in another order (concurrent clients), each index still gets its trigger.
        let c: Vec<_> = (0..1000).rev().map(|n| mix.pick(42, n)).collect();
        assert_eq!(a, c.into_iter().rev().collect::<Vec<_>>());
        let d: Vec<_> = (0..1000).map(|n| mix.pick(43, n)).collect();
        assert_ne!(a, d, "another seed, another sequence");
        for t in [Trigger::Complete, Trigger::Decline, Trigger::Flaky] {
            assert!(a.contains(&t), "{t} is drawn");
        }
        assert!(!a.contains(&Trigger::Compensate), "a trigger not in the mix is never drawn");
    }

    #[test]
    fn a_single_trigger_mix_always_draws_it_and_zero_weights_drop_out() {
        let mix = Mix::parse(" out-of-stock = 3 , complete=0").unwrap();
        assert!((0..100).all(|n| mix.pick(1, n) == Trigger::OutOfStock));
        assert_eq!(mix.triggers().collect::<Vec<_>>(), [Trigger::OutOfStock]);
    }

    #[test]
    fn bad_mixes_say_what_to_do() {
        assert!(Mix::parse("complete").unwrap_err().contains("NAME=WEIGHT"));
        assert!(Mix::parse("complete=x").unwrap_err().contains("whole number"));
        let e = Mix::parse("refund=1").unwrap_err();
        assert!(e.contains("unknown trigger 'refund'") && e.contains("compensate"), "{e}");
        assert!(Mix::parse("complete=0").unwrap_err().contains("above 0"));
        assert!(Mix::parse("").unwrap_err().contains("above 0"));
        assert!(Mix::parse("complete=1,complete=2").unwrap_err().contains("twice"));
    }

    #[test]
    fn every_trigger_has_a_body_and_an_expected_status() {
        let bodies = Bodies::new();
        for t in Trigger::ALL {
            let body: serde_json::Value = serde_json::from_slice(&bodies.get(t)).unwrap();
            assert_eq!(body, t.body());
            assert_eq!(Trigger::parse(t.name()), Some(t));
        }
        assert_eq!(Trigger::Compensate.body()["ship_to"]["country"], "XX");
        assert_eq!(Trigger::Decline.expected().status(), "CANCELLED");
        assert_eq!(Trigger::Flaky.expected().status(), "COMPLETED");
    }
}
