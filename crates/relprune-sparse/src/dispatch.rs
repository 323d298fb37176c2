//! When a sparse product beats the dense one: a crossover table, measured on this project's
//! reference machine and checked in (`crossover.tsv`, re-measured by `cargo xtask crossover`),
//! that gives for each thread count, sparsity pattern and batch size the largest density at which
//! the sparse kernels are faster than dense by a margin. The thread count matters: with fewer
//! threads the dense product (compute-bound) slows more than the sparse one at some points and
//! less at others, so a crossover measured with two threads can be wrong with one.
//!
//! The table's text format: one `threads pattern batch max_density` line per measured point (`#`
//! starts a comment), `pattern` being `unstructured` or `N:M`; a batch between two measured ones
//! takes the smaller of their densities, a batch past the last the last's. A table answers for
//! one thread count at a time ([`Crossover::for_threads`]).

use crate::{Error, Result};

/// How a weight's zeros are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pattern {
    /// Anywhere.
    Unstructured,
    /// At most `n` non-zeros in every group of `m` consecutive columns.
    NM(usize, usize),
}

impl Pattern {
    /// Its name in the table.
    pub fn name(self) -> String {
        match self {
            Self::Unstructured => "unstructured".into(),
            Self::NM(n, m) => format!("{n}:{m}"),
        }
    }

    fn parse(s: &str) -> Option<Self> {
        if s == "unstructured" {
            return Some(Self::Unstructured);
        }
        let (n, m) = s.split_once(':')?;
        Some(Self::NM(n.parse().ok()?, m.parse().ok()?))
    }
}

/// One measured point: up to `max_density`, sparse wins at `batch` with `threads` threads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// The threads the products ran on.
    pub threads: usize,
    /// The pattern measured.
    pub pattern: Pattern,
    /// Inputs per product.
    pub batch: usize,
    /// The largest density at which the sparse product was faster by the margin (0: never).
    pub max_density: f64,
}

/// The crossover table.
#[derive(Clone, Debug, PartialEq)]
pub struct Crossover {
    points: Vec<Point>,
}

/// The table measured for this repository (see the module documentation).
const MEASURED: &str = include_str!("../crossover.tsv");

impl Crossover {
    /// The checked-in table.
    pub fn measured() -> &'static Crossover {
        static TABLE: std::sync::OnceLock<Crossover> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| Crossover::parse(MEASURED).expect("the checked-in crossover table"))
    }

    /// A table from its points.
    pub fn new(mut points: Vec<Point>) -> Self {
        points.sort_by_key(|p| (p.threads, p.pattern, p.batch));
        Self { points }
    }

    /// The points measured with the thread count nearest `threads`: that count if measured,
    /// else the largest below it, else the smallest measured.
    pub fn for_threads(&self, threads: usize) -> Crossover {
        let counts = self.points.iter().map(|p| p.threads);
        let pick = counts
            .clone()
            .filter(|&t| t <= threads)
            .max()
            .or_else(|| counts.min());
        Self::new(
            self.points
                .iter()
                .filter(|p| Some(p.threads) == pick)
                .copied()
                .collect(),
        )
    }

    /// The points measured with this process's thread count (rayon's).
    pub fn for_this_process(&self) -> Crossover {
        self.for_threads(rayon::current_num_threads())
    }

    /// This table with the points of `other`'s thread counts replaced by `other`'s.
    pub fn merged(&self, other: &Crossover) -> Crossover {
        let replaced = |t: usize| other.points.iter().any(|p| p.threads == t);
        Self::new(
            self.points
                .iter()
                .filter(|p| !replaced(p.threads))
                .chain(&other.points)
                .copied()
                .collect(),
        )
    }

    /// Parses the text format; errors name the line.
    pub fn parse(text: &str) -> Result<Self> {
        let mut points = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = || Error::Value(format!("crossover table line {}: `{line}`", i + 1));
            let f: Vec<&str> = line.split_whitespace().collect();
            let [t, p, b, d] = f[..] else {
                return Err(bad());
            };
            let threads = t.parse().ok().filter(|&t: &usize| t > 0).ok_or_else(bad)?;
            let pattern = Pattern::parse(p).ok_or_else(bad)?;
            let batch = b.parse().map_err(|_| bad())?;
            let max_density: f64 = d.parse().map_err(|_| bad())?;
            if !(0.0..=1.0).contains(&max_density) {
                return Err(bad());
            }
            points.push(Point {
                threads,
                pattern,
                batch,
                max_density,
            });
        }
        Ok(Self::new(points))
    }

    /// The text format.
    pub fn to_text(&self) -> String {
        let mut s = String::from("# threads pattern batch max_density\n");
        for p in &self.points {
            s.push_str(&format!(
                "{} {} {} {:.4}\n",
                p.threads,
                p.pattern.name(),
                p.batch,
                p.max_density
            ));
        }
        s
    }

    /// The points.
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// The largest density at which sparse wins for `pattern` at `batch` (0 when the pattern
    /// was never measured). Meant for a one-thread-count table ([`Crossover::for_threads`]).
    pub fn max_density(&self, pattern: Pattern, batch: usize) -> f64 {
        let pts: Vec<&Point> = self
            .points
            .iter()
            .filter(|p| p.pattern == pattern)
            .collect();
        let below = pts.iter().rev().find(|p| p.batch <= batch);
        let above = pts.iter().find(|p| p.batch >= batch);
        match (below, above) {
            (Some(a), Some(b)) => a.max_density.min(b.max_density),
            (Some(p), None) | (None, Some(p)) => p.max_density,
            (None, None) => 0.0,
        }
    }

    /// Whether a layer of `pattern` and `density` runs sparse at `batch`.
    pub fn sparse_wins(&self, pattern: Pattern, density: f64, batch: usize) -> bool {
        density <= self.max_density(pattern, batch)
    }

    /// Whether a layer of `pattern` and `density` runs dense at some batch size (then it keeps
    /// its dense weight too).
    pub fn dense_somewhere(&self, pattern: Pattern, density: f64) -> bool {
        let pts = self.points.iter().filter(|p| p.pattern == pattern);
        pts.clone().count() == 0 || pts.into_iter().any(|p| density > p.max_density)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_round_trips_and_interpolates_conservatively() {
        let t = Crossover::parse(
            "# threads pattern batch max_density\n2 unstructured 1 0.10\n2 unstructured 64 0.40 # mid\n2 2:4 64 0.5\n",
        )
        .unwrap();
        assert_eq!(Crossover::parse(&t.to_text()).unwrap(), t);
        assert_eq!(t.max_density(Pattern::Unstructured, 1), 0.10);
        assert_eq!(t.max_density(Pattern::Unstructured, 8), 0.10);
        assert_eq!(t.max_density(Pattern::Unstructured, 10_000), 0.40);
        assert!(t.sparse_wins(Pattern::NM(2, 4), 0.5, 64));
        assert!(!t.sparse_wins(Pattern::NM(4, 8), 0.5, 64));
        assert!(t.dense_somewhere(Pattern::Unstructured, 0.2));
        assert!(!t.dense_somewhere(Pattern::Unstructured, 0.05));
        let e = Crossover::parse("2 unstructured x 0.1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        assert!(Crossover::parse("2 unstructured 1 1.5").is_err());
        assert!(Crossover::parse("0 unstructured 1 0.5").is_err());
        assert!(Crossover::parse("unstructured 1 0.5").is_err());
    }

    #[test]
    fn each_thread_count_answers_from_its_own_points_or_the_nearest_below() {
        let t = Crossover::parse(
            "1 unstructured 8192 0.30\n2 unstructured 8192 0.50\n4 unstructured 8192 0.60\n",
        )
        .unwrap();
        let at = |n| t.for_threads(n).max_density(Pattern::Unstructured, 8192);
        assert_eq!(at(1), 0.30);
        assert_eq!(at(2), 0.50);
        assert_eq!(at(3), 0.50);
        assert_eq!(at(64), 0.60);
        let only_two = Crossover::parse("2 unstructured 8192 0.50\n").unwrap();
        assert_eq!(
            only_two
                .for_threads(1)
                .max_density(Pattern::Unstructured, 8192),
            0.50
        );
        let remeasured = Crossover::parse("2 unstructured 8192 0.45\n").unwrap();
        let m = t.merged(&remeasured);
        assert_eq!(m.points().len(), 3);
        assert_eq!(
            m.for_threads(2).max_density(Pattern::Unstructured, 8192),
            0.45
        );
        assert_eq!(
            m.for_threads(1).max_density(Pattern::Unstructured, 8192),
            0.30
        );
    }

    #[test]
    fn the_checked_in_table_parses() {
        assert!(!Crossover::measured().points().is_empty());
    }
}
