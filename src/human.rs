//! Numbers as an operator reads them: "1 call", "2 calls", "172 B", "2.10 GB", "3 min 12 s".

/// `n` and the noun, singular for one: `count(1, "call")` is "1 call".
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A size in bytes, in decimal units past a thousand: "999 B", "1.4 kB", "12.3 MB", "2.10 GB".
pub fn bytes(n: u64) -> String {
    const UNITS: [(f64, &str); 4] = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")];
    let value = n as f64;
    match UNITS.iter().find(|(size, _)| value >= *size) {
        None => format!("{n} B"),
        Some((size, unit)) if value / size < 10.0 => format!("{:.2} {unit}", value / size),
        Some((size, unit)) => format!("{:.1} {unit}", value / size),
    }
}

/// A span of time in the largest units that matter: "850 ms", "42 s", "3 min 12 s",
/// "2 h 5 min".
pub fn duration(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0 => format!("{ms} ms"),
        1..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min {} s", secs / 60, secs % 60),
        _ => format!("{} h {} min", secs / 3600, secs / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_sizes_read_well() {
        assert_eq!(count(1, "call"), "1 call");
        assert_eq!(count(0, "call"), "0 calls");
        assert_eq!(count(2, "dead letter"), "2 dead letters");
        assert_eq!(bytes(172), "172 B");
        assert_eq!(bytes(1_400), "1.40 kB");
        assert_eq!(bytes(12_345_678), "12.3 MB");
        assert_eq!(bytes(2_100_000_000), "2.10 GB");
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(192_000), "3 min 12 s");
        assert_eq!(duration(7_500_000), "2 h 5 min");
    }
}
