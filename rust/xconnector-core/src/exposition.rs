//! Several Prometheus text expositions (the SDK's families, each engine's) merged into one, so a
//! family that several engines export appears once with all their samples: Prometheus' text
//! format allows one `# HELP`/`# TYPE` per family, and `prometheus_client` rejects a collector
//! whose families repeat.
//!
//! Invariants: families keep the order of their first appearance; samples keep their order within
//! each input, inputs in the order given; a sample belongs to the family named by the last
//! `# HELP`/`# TYPE` line above it in its own input (histograms' `_bucket`, `_sum` and `_count`
//! samples included); the first input's `# HELP`/`# TYPE` of a family wins.

#[derive(Default)]
struct Family {
    name: String,
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// `texts` as one exposition (version 0.0.4). Samples before any family line keep no family and
/// are kept at the end, so nothing is lost.
pub fn merge<S: AsRef<str>>(texts: &[S]) -> String {
    let mut families: Vec<Family> = Vec::new();
    let mut orphans: Vec<String> = Vec::new();
    for text in texts {
        let mut current: Option<usize> = None;
        for line in text.as_ref().lines().filter(|l| !l.trim().is_empty()) {
            let meta =
                line.strip_prefix("# HELP ").map(|r| (true, r)).or(line.strip_prefix("# TYPE ").map(|r| (false, r)));
            if let Some((help, rest)) = meta {
                let name = rest.split_whitespace().next().unwrap_or_default();
                let at = match families.iter().position(|f| f.name == name) {
                    Some(at) => at,
                    None => {
                        families.push(Family { name: name.to_owned(), ..Family::default() });
                        families.len() - 1
                    }
                };
                let f = &mut families[at];
                let slot = if help { &mut f.help } else { &mut f.kind };
                slot.get_or_insert_with(|| line.to_owned());
                current = Some(at);
            } else if line.starts_with('#') {
                continue; // a comment
            } else if let Some(at) = current {
                families[at].samples.push(line.to_owned());
            } else {
                orphans.push(line.to_owned());
            }
        }
    }
    let mut out = String::new();
    for f in families {
        for line in f.help.iter().chain(&f.kind).chain(&f.samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    for line in orphans {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_repeated_across_inputs_appear_once_with_every_sample() {
        let sdk = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n";
        let e1 = "# HELP x_total X.\n# TYPE x_total counter\nx_total{namespace=\"1\"} 3\n\
                  # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
        let e2 = "# HELP x_total X again.\n# TYPE x_total counter\nx_total{namespace=\"2\"} 4\n\
                  # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.25\nh_count 1\n";
        let merged = merge(&[sdk, e1, e2]);
        assert_eq!(
            merged,
            "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n\
             # HELP x_total X.\n# TYPE x_total counter\nx_total{namespace=\"1\"} 3\nx_total{namespace=\"2\"} 4\n\
             # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n\
             h_bucket{le=\"+Inf\"} 1\nh_sum 0.25\nh_count 1\n"
        );
    }

    #[test]
    fn one_input_is_unchanged_and_nothing_is_dropped() {
        let one = "# HELP a A.\n# TYPE a gauge\na 1\n# HELP b B.\n# TYPE b gauge\nb 2\n";
        assert_eq!(merge(&[one]), one);
        assert_eq!(merge::<&str>(&[]), "");
        // A family with no samples keeps its lines; a sample above every family line is kept;
        // comments and blank lines are not samples.
        let odd = "stray 1\n\n# a comment\n# HELP e E.\n# TYPE e counter\n";
        assert_eq!(merge(&[odd]), "# HELP e E.\n# TYPE e counter\nstray 1\n");
    }
}
