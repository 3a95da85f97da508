//! Median / p90 / p99 (nearest rank) and ratios.

use serde_json::{json, Value};

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// Summary of samples in microseconds, reported in milliseconds.
pub fn summary_ms(us: &[f64]) -> Value {
    summary(&us.iter().map(|u| u / 1000.0).collect::<Vec<_>>(), 3)
}

pub fn summary(values: &[f64], digits: i32) -> Value {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return json!({"n": 0});
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    json!({
        "n": v.len(),
        "p50": round(percentile(&v, 50.0), digits),
        "p90": round(percentile(&v, 90.0), digits),
        "p99": round(percentile(&v, 99.0), digits),
        "mean": round(mean, digits),
        "min": round(v[0], digits),
        "max": round(v[v.len() - 1], digits),
    })
}

/// a / b for p50, p90, p99 of two summaries.
pub fn ratio(a: &Value, b: &Value) -> Value {
    let r = |k: &str| match (a[k].as_f64(), b[k].as_f64()) {
        (Some(x), Some(y)) if y > 0.0 => json!(round(x / y, 3)),
        _ => Value::Null,
    };
    json!({"p50": r("p50"), "p90": r("p90"), "p99": r("p99")})
}

/// Raw samples, µs → ms with 0.01 ms resolution (kept in results.json).
pub fn raw_ms(us: &[f64]) -> Value {
    json!(us.iter().map(|u| round(u / 1000.0, 2)).collect::<Vec<_>>())
}
