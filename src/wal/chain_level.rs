//! The zstd level of the writer's chains: as high as the load leaves room
//! for.
//!
//! The level that pays depends on the load. Under a heavy one, compression
//! is paid per sample on the commit path, and level 1 is the one that keeps
//! the relay's CPU per sample low. Under a light one (a real Prometheus
//! scraping a few hundred series every few seconds) each frame holds one
//! small request, the CPU is nothing whatever the level, and the level
//! decides how long an outage the volume rides out: measured on a real
//! sender's 5-minute segments with `frame_context` (`benches/README.md`),
//! bytes per sample of chained frames at level 1 / 3 / 6 are 6.1-6.3 /
//! 4.8-4.9 / 4.35-4.46, for 39 / 50 / 115 ns of compression per sample.
//!
//! So the writer compresses at the floor (`--zstd-level`) and, at the end
//! of each [`WINDOW`], climbs towards the ceiling (`--zstd-max-level`) by
//! as many levels as keep compression within [`CPU_BUDGET`] of one core if
//! each level cost twice the one below it (measured above: at most 1.8x
//! from one level to the next up to 9): at a light load, straight to the
//! ceiling after the first window. Each climb is checked by the next
//! window's measure. It drops back to the floor at once when compressing
//! takes more than the budget, even before a window ends, so a burst after
//! a quiet spell pays the higher level for at most [`CPU_BUDGET`] ×
//! [`WINDOW`] of compression time. Climbing in one step matters: a new
//! level starts a new chain, and the first frames of a chain pay again for
//! their senders' labels (a real Prometheus with two scrape jobs: two
//! frames of about 9 KB where the chain's frames take 1.5-2.5 KB).
//!
//! What is measured is the wall time of compressing the frames, on the
//! commit thread: on a busy machine that is more than the CPU time, which
//! errs towards the floor. A level change starts a new chain (the caller's
//! job): a chain has one level, and the first frame of a chain pays again
//! for what its sender repeats, one request's worth at a light load.

use std::time::{Duration, Instant};

/// The share of one core that compression above the floor may take.
/// At 0.5 %, a relay stays at level 6 up to about 40,000 samples/s of a
/// real sender's requests, and the benchmark's loads (millions of samples
/// per second) never leave the floor.
pub const CPU_BUDGET: f64 = 0.005;

/// How long the compression time is summed over before a climb.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Chooses the level of the next chain (see the module documentation).
#[derive(Debug)]
pub struct ChainLevel {
    floor: i32,
    ceiling: i32,
    level: i32,
    /// When the current window began: at the first frame compressed in it.
    window_start: Option<Instant>,
    /// Compression time in the current window.
    spent: Duration,
}

impl ChainLevel {
    /// Levels from `floor` to `ceiling` (a ceiling below the floor is the
    /// floor: one level always), starting at the floor.
    pub fn new(floor: i32, ceiling: i32) -> Self {
        Self {
            floor,
            ceiling: ceiling.max(floor),
            level: floor,
            window_start: None,
            spent: Duration::ZERO,
        }
    }

    /// The level for the frames compressed next.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Accounts `spent` compressing frames, which ended at `now`, and
    /// returns the level for the frames compressed next.
    pub fn record(&mut self, spent: Duration, now: Instant) -> i32 {
        let start = *self.window_start.get_or_insert(now);
        self.spent += spent;
        let allowance = WINDOW.mul_f64(CPU_BUDGET);
        if self.spent > allowance {
            // Over the budget of a whole window already: back to the floor
            // now, not at the window's end.
            return self.next_window(now, self.floor);
        }
        let elapsed = now.saturating_duration_since(start);
        if elapsed < WINDOW {
            return self.level;
        }
        let usage = self.spent.as_secs_f64() / elapsed.as_secs_f64();
        let level = if usage > CPU_BUDGET {
            self.floor
        } else {
            // Each level up may double the cost: as many as stay within
            // the budget so.
            let mut level = self.level;
            let mut cost = usage * 2.0;
            while level < self.ceiling && cost < CPU_BUDGET {
                level += 1;
                cost *= 2.0;
            }
            level
        };
        self.next_window(now, level)
    }

    fn next_window(&mut self, now: Instant, level: i32) -> i32 {
        self.window_start = Some(now);
        self.spent = Duration::ZERO;
        self.level = level;
        level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `frames` frames of `each` compression time, evenly over `span`
    /// from `t`, and returns the level after the last one and the time.
    fn run(
        c: &mut ChainLevel,
        t: Instant,
        span: Duration,
        frames: u32,
        each: Duration,
    ) -> (i32, Instant) {
        let step = span / frames;
        let mut now = t;
        let mut level = c.level();
        for _ in 0..frames {
            now += step;
            level = c.record(each, now);
        }
        (level, now)
    }

    #[test]
    fn a_light_load_climbs_to_the_ceiling_after_one_window() {
        let mut c = ChainLevel::new(1, 6);
        let mut t = Instant::now();
        // A request every 5 s, 0.1 ms to compress: 0.002 % of a core. The
        // first window begins at the first frame, so it ends a frame later
        // than the others.
        let mut seen = vec![c.level()];
        for _ in 0..4 {
            let (level, now) = run(&mut c, t, WINDOW, 2, MS / 10);
            t = now;
            seen.push(level);
        }
        assert_eq!(seen, [1, 1, 6, 6, 6]);
    }

    #[test]
    fn a_middling_load_climbs_as_far_as_doubling_costs_allow() {
        let mut c = ChainLevel::new(1, 6);
        let t = Instant::now();
        // 0.06 % of a core at level 1: three doublings stay under 0.5 %
        // (decided at the last frame, 10 s after the first).
        let (level, t) = run(&mut c, t, WINDOW * 101 / 100, 101, MS * 6 / 100);
        assert_eq!(level, 4);
        // If level 4 costs 0.3 %, nothing more.
        let (level, _) = run(&mut c, t, WINDOW * 3, 300, MS * 3 / 10);
        assert_eq!(level, 4);
    }

    #[test]
    fn a_load_near_the_budget_holds_its_level() {
        let mut c = ChainLevel::new(1, 6);
        let t = Instant::now();
        // 0.3 % of a core: under the budget, but a level up could pass it.
        let (level, _) = run(&mut c, t, WINDOW * 5, 500, MS * 3 / 10);
        assert_eq!(level, 1);
    }

    #[test]
    fn a_burst_drops_to_the_floor_before_the_window_ends() {
        let mut c = ChainLevel::new(1, 6);
        let mut t = Instant::now();
        for _ in 0..6 {
            t = run(&mut c, t, WINDOW, 1, MS / 10).1;
        }
        assert_eq!(c.level(), 6);
        // 10 ms of compression every 100 ms: 10 % of a core.
        let allowance = WINDOW.mul_f64(CPU_BUDGET);
        let mut spent = Duration::ZERO;
        while c.level() == 6 {
            t += 100 * MS;
            c.record(10 * MS, t);
            spent += 10 * MS;
            assert!(spent <= allowance + 10 * MS, "still at 6 after {spent:?}");
        }
        assert_eq!(c.level(), 1);
    }

    #[test]
    fn a_heavy_load_never_leaves_the_floor() {
        let mut c = ChainLevel::new(1, 6);
        let t = Instant::now();
        // 20 % of a core, in frames every 2 ms.
        let (level, _) = run(&mut c, t, WINDOW * 3, 15_000, MS * 4 / 10);
        assert_eq!(level, 1);
    }

    #[test]
    fn a_ceiling_at_or_below_the_floor_is_one_level() {
        for (floor, ceiling) in [(3, 3), (3, 1)] {
            let mut c = ChainLevel::new(floor, ceiling);
            let t = Instant::now();
            let (level, _) = run(&mut c, t, WINDOW * 10, 10, MS / 10);
            assert_eq!(level, floor);
        }
    }

    #[test]
    fn an_idle_gap_counts_as_time_without_compression() {
        let mut c = ChainLevel::new(1, 6);
        let t = Instant::now();
        c.record(MS, t);
        // One frame an hour later: the window's usage is tiny.
        assert_eq!(c.record(MS, t + Duration::from_secs(3600)), 6);
    }
}
