//! The end of a benchmark: the table, the chart, and the check of
//! `/metrics` against the counts.

use std::fmt::Write as _;

use crate::load::LoadReport;

/// Thousands separated by commas.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// Milliseconds with two decimals, or microseconds below a millisecond.
fn millis(d: std::time::Duration) -> String {
    if d < std::time::Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1000.0)
    }
}

/// The runs side by side as a Markdown table; the last is the baseline
/// (no cache) that "queries saved" compares with. Open-loop runs also
/// show their offered rate and how late their requests were sent.
pub fn table(runs: &[(&str, &LoadReport)]) -> String {
    let Some((_, baseline)) = runs.last() else {
        return String::new();
    };
    let mut out = String::from("|");
    for (name, _) in runs {
        let _ = write!(out, " | {name}");
    }
    out.push_str(" |\n|---");
    for _ in runs {
        out.push_str("|---:");
    }
    out.push_str("|\n");
    let mut row = |label: &str, cell: &dyn Fn(&LoadReport) -> String| {
        let _ = write!(out, "| {label}");
        for (_, run) in runs {
            let _ = write!(out, " | {}", cell(run));
        }
        out.push_str(" |\n");
    };
    let open = runs.iter().any(|(_, r)| r.rate.is_some());
    if open {
        row("offered rate", &|r| {
            r.rate.map_or("–".into(), |rate| {
                format!("{} req/s", grouped(rate as u64))
            })
        });
    }
    row("requests", &|r| grouped(r.requests));
    row("SQL queries", &|r| grouped(r.counts.sql));
    row("queries saved", &|r| {
        if std::ptr::eq(r, *baseline) || baseline.counts.sql == 0 {
            "–".into()
        } else {
            percent(1.0 - r.counts.sql as f64 / baseline.counts.sql as f64)
        }
    });
    row("cache hits / misses", &|r| {
        if r.counts.hits + r.counts.misses == 0 {
            "–".into()
        } else {
            format!("{} / {}", grouped(r.counts.hits), grouped(r.counts.misses))
        }
    });
    row("hit ratio", &|r| r.hit_ratio().map_or("–".into(), percent));
    row("p50 latency", &|r| millis(r.latency_at(0.50)));
    row("p99 latency", &|r| millis(r.latency_at(0.99)));
    row("p99.9 latency", &|r| millis(r.latency_at(0.999)));
    row("throughput", &|r| {
        format!("{} req/s", grouped(r.throughput() as u64))
    });
    if open {
        row("sent late, p50 / p99", &|r| {
            if r.rate.is_some() {
                format!(
                    "{} / {}",
                    millis(r.send_lag_at(0.50)),
                    millis(r.send_lag_at(0.99))
                )
            } else {
                "–".into()
            }
        });
    }
    row("failed requests", &|r| grouped(r.failures));
    out
}

/// The outside writer's runs side by side as a Markdown table: each
/// run's name, its stale reads, the outside writes made during it, the run.
pub fn stale_table(
    runs: &[(&str, &crate::outside::Staleness, usize, &LoadReport)],
    bound: std::time::Duration,
) -> String {
    let mut out = String::from("|");
    for (name, ..) in runs {
        let _ = write!(out, " | {name}");
    }
    out.push_str(" |\n|---");
    for _ in runs {
        out.push_str("|---:");
    }
    out.push_str("|\n");
    let mut row =
        |label: &str, cell: &dyn Fn(&crate::outside::Staleness, usize, &LoadReport) -> String| {
            let _ = write!(out, "| {label}");
            for (_, stale, writes, run) in runs {
                let _ = write!(out, " | {}", cell(stale, *writes, run));
            }
            out.push_str(" |\n");
        };
    row("outside updates", &|_, writes, _| grouped(writes as u64));
    row("user reads checked", &|s, _, _| grouped(s.reads));
    row("stale reads", &|s, _, _| grouped(s.stale));
    row(
        &format!("stale beyond {} ms", bound.as_millis()),
        &|s, _, _| grouped(s.beyond_bound),
    );
    row("stalest read", &|s, _, _| millis(s.worst));
    row("SQL queries", &|_, _, r| grouped(r.counts.sql));
    row("hit ratio", &|_, _, r| {
        r.hit_ratio().map_or("–".into(), percent)
    });
    row("p50 / p99 latency", &|_, _, r| {
        format!(
            "{} / {}",
            millis(r.latency_at(0.50)),
            millis(r.latency_at(0.99))
        )
    });
    out
}

/// A PNG: SQL queries per second over time with the cache and without,
/// and the cache's hit ratio (right axis).
pub fn chart(cached: &LoadReport, uncached: &LoadReport) -> Result<Vec<u8>, String> {
    let len = cached.timeline.len().max(uncached.timeline.len());
    let step = cached
        .timeline
        .first()
        .or(uncached.timeline.first())
        .map_or(0.25, |s| s.at);
    let column = |run: &LoadReport, value: &dyn Fn(&crate::load::Sample) -> Option<f64>| {
        (0..len)
            .map(|i| run.timeline.get(i).and_then(value))
            .collect::<Vec<_>>()
    };
    let labels: Vec<String> = (1..=len)
        .map(|i| format!("{:.1}", i as f64 * step))
        .collect();
    let json = serde_json::json!({
        "width": 900,
        "height": 420,
        "title_text": "SQL queries per second, with and without redis-cached",
        "sub_title_text": "x: seconds into the run; right axis: hit ratio (%)",
        "legend_align": "right",
        "legend_margin": {"top": 40},
        "margin": {"left": 10, "top": 10, "right": 10, "bottom": 10},
        "series_smooth": true,
        "series_list": [
            {"name": "no cache", "data": column(uncached, &|s| Some(s.sql_per_s))},
            {"name": "cache", "data": column(cached, &|s| Some(s.sql_per_s))},
            {"name": "hit ratio", "data": column(cached, &|s| s.hit_ratio.map(|r| r * 100.0)), "y_axis_index": 1},
        ],
        "x_axis_data": labels,
        "y_axis_configs": [
            {"axis_min": 0},
            {"axis_min": 0, "axis_max": 100}
        ],
    });
    let chart = charts_rs::LineChart::from_json(&json.to_string()).map_err(|e| e.to_string())?;
    let svg = chart.svg().map_err(|e| e.to_string())?;
    charts_rs::svg_to_png(&svg).map_err(|e| e.to_string())
}

/// The sum of every series of a counter in a Prometheus text exposition
/// (`name{labels} value` lines), `None` if it has none.
pub fn counter_total(exposition: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue; // a longer name with this prefix
        }
        let value = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())?;
        *total.get_or_insert(0.0) += value;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_their_labels_only() {
        let text = "# TYPE redis_cached_hits_total counter\n\
                    redis_cached_hits_total{fn=\"a\",cache=\"demo\"} 3\n\
                    redis_cached_hits_total{fn=\"b\",cache=\"demo\"} 4\n\
                    redis_cached_hits_totally 100\n\
                    redis_cached_misses_total{fn=\"a\",cache=\"demo\"} 2\n";
        assert_eq!(counter_total(text, "redis_cached_hits_total"), Some(7.0));
        assert_eq!(counter_total(text, "redis_cached_misses_total"), Some(2.0));
        assert_eq!(counter_total(text, "redis_cached_stale_serves_total"), None);
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(12), "12");
        assert_eq!(millis(std::time::Duration::from_micros(28)), "28 µs");
        assert_eq!(millis(std::time::Duration::from_micros(2_574)), "2.57 ms");
    }
}
