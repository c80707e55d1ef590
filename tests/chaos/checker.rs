//! The checker: reads a merged history and reports every breach of the invariants.
//!
//! A *hold* is one start of a task: it opens at the `start_callback` line (written
//! after the claim succeeded in Redis) and closes at its first `timeout_callback` /
//! `stop_callback` line (written before the slot is freed), or when a replica reports
//! it reclaimed. So a hold's interval in the log lies inside Redis's real holding
//! interval, and counts of live holds in log order are sound lower bounds.
//!
//! Data loss (`FLUSHALL`, a restart without persistence) ends every hold open in
//! Redis at the fault, but its task still runs: such a *lost* hold stays live in the
//! log until its task learns it (its first refused keepalive/stop after the fault) or
//! until the quarantine would have let a new generation start (the loss's Redis time
//! plus the slot timeout), whichever comes first. So "never more than N live holds"
//! checks that no new generation started beside the lost one before the lost tasks
//! knew or the quarantine ended. A lost hold never gets its callbacks (the state is
//! gone) and is not reported as never ended. See [`Checker::data_loss`] for the rest.
//!
//! Each hold's lease comes from the `start_callback` line (read from Redis at start,
//! later from the lease-aware hook) or from the replica's `start` report line; an
//! end's lease from the `timed_out` report line of the same tick, or from the
//! `stop_sent` line of the stop that ran it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde_json::Value;

use crate::history::Line;

/// What the checker needs to know besides the history.
#[derive(Debug, Clone)]
pub struct Params {
    pub slots: usize,
    pub timeout_ms: u64,
    /// Slack after a slot timeout for the sweep to happen (ticks, load).
    pub margin_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Violation {
    /// Which rule, for the summary.
    pub kind: &'static str,
    pub what: String,
    pub lines: Vec<String>,
}

/// Counts for the table and the summary.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub lines: usize,
    pub replicas: usize,
    pub holds: usize,
    pub stops: usize,
    pub timeouts: usize,
    pub reclaims: usize,
    /// Claims whose start never ran (the replica died in between), ended by a
    /// timeout or a reclaim.
    pub orphan_ends: usize,
    /// Keepalives / stops sent after their hold ended, and refused.
    pub stale_refused: usize,
    pub keepalives_ok: usize,
    pub faults: usize,
    pub kills: usize,
    pub inspections: usize,
    pub corrupt_reports: usize,
    /// Holds open when Redis lost the state, and how many of their tasks learned it.
    pub lost_holds: usize,
    pub lost_learned: usize,
    pub torn: usize,
    pub max_live: usize,
}

#[derive(Debug, Default)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub stats: Stats,
}

impl Report {
    /// A count per rule, then examples of each rule in turn (at most `limit`) with
    /// their lines.
    pub fn render(&self, limit: usize) -> String {
        let mut out = String::new();
        let mut kinds: BTreeMap<&str, Vec<&Violation>> = BTreeMap::new();
        for v in &self.violations {
            kinds.entry(v.kind).or_default().push(v);
        }
        for (kind, vs) in &kinds {
            let _ = writeln!(out, "{:6} x {kind}", vs.len());
        }
        let mut shown = 0;
        for round in 0.. {
            let mut any = false;
            for vs in kinds.values() {
                let Some(v) = vs.get(round) else { continue };
                any = true;
                if shown < limit {
                    shown += 1;
                    let _ = writeln!(out, "VIOLATION [{}]: {}", v.kind, v.what);
                    for l in v.lines.iter().take(8) {
                        let _ = writeln!(out, "    {l}");
                    }
                }
            }
            if !any || shown >= limit {
                break;
            }
        }
        if self.violations.len() > shown {
            let _ = writeln!(out, "... and {} more", self.violations.len() - shown);
        }
        let _ = writeln!(out, "{} invariant violation(s)", self.violations.len());
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndKind {
    Timeout,
    Stop,
}

#[derive(Debug)]
struct End {
    idx: usize,
    kind: EndKind,
    pid: u64,
}

#[derive(Debug)]
struct Hold {
    task: String,
    pid: u64,
    open: usize,
    lease: Option<u64>,
    slot: Option<String>,
    taken: bool,
    ends: Vec<End>,
    /// Where a reclaim closes it (the reclaiming replica's tick line) and the report line.
    reclaimed: Option<(usize, usize)>,
    /// Stuck in a slot corrupted by hand while it held it: may never end.
    exempt: bool,
    /// Open in Redis when the state was lost.
    lost: Option<Lost>,
}

/// A hold of the generation Redis lost.
#[derive(Debug, Clone, Copy)]
struct Lost {
    /// The fault line: where the hold ended for Redis.
    fault: usize,
    /// Where it ends in the log: its task's first refused call after the fault, or
    /// the first line at or past the loss + the slot timeout, whichever first.
    until: usize,
}

impl Hold {
    /// The first line at which the hold is over in Redis (a lost hold: at the fault).
    fn close(&self) -> Option<usize> {
        let ends = self.ends.iter().map(|e| e.idx);
        ends.chain(self.reclaimed.map(|r| r.0))
            .chain(self.lost.map(|l| l.fault))
            .min()
    }
    /// The first line at which the hold is over in the log: as [`close`](Self::close),
    /// but a lost hold lives on until its task knew or the quarantine ended.
    fn log_close(&self) -> Option<usize> {
        let ends = self.ends.iter().map(|e| e.idx);
        ends.chain(self.reclaimed.map(|r| r.0))
            .chain(self.lost.map(|l| l.until))
            .min()
    }
    /// Whether the hold was live in the log over the whole of `from..=to`.
    fn live_over(&self, from: usize, to: usize) -> bool {
        self.open < from && self.close().is_none_or(|c| c > to)
    }
}

struct Checker<'a> {
    p: &'a Params,
    lines: &'a [Line],
    /// Position of each line in `lines` by its idx.
    at: HashMap<usize, usize>,
    /// Line idxs per pid, in order.
    by_pid: HashMap<u64, Vec<usize>>,
    holds: Vec<Hold>,
    by_lease: HashMap<u64, usize>,
    by_task: HashMap<String, Vec<usize>>,
    out: Report,
}

/// Checks a history. `torn` are lines that did not parse.
pub fn check(p: &Params, lines: &[Line], torn: &[String]) -> Report {
    let mut c = Checker {
        p,
        lines,
        at: lines.iter().enumerate().map(|(i, l)| (l.idx, i)).collect(),
        by_pid: HashMap::new(),
        holds: Vec::new(),
        by_lease: HashMap::new(),
        by_task: HashMap::new(),
        out: Report::default(),
    };
    for l in lines {
        c.by_pid.entry(l.pid()).or_default().push(l.idx);
    }
    c.out.stats.lines = lines.len();
    c.out.stats.torn = torn.len();
    c.holds_from_starts();
    c.ends();
    c.reports();
    c.data_loss();
    c.faults();
    c.per_hold();
    c.per_task();
    c.calls();
    c.inspections();
    c.live_counts();
    c.leak_bounds();
    c.final_state();
    let kills = c.out.stats.kills;
    if torn.len() > kills {
        // A SIGKILL may cut one write of the process it kills; nothing else may.
        c.violation(
            "torn lines",
            format!(
                "{} torn line(s) in the history ({kills} replica kill(s))",
                torn.len()
            ),
            torn.to_vec(),
        );
    }
    c.out
}

impl<'a> Checker<'a> {
    fn line(&self, idx: usize) -> &'a Line {
        &self.lines[self.at[&idx]]
    }

    fn raw(&self, idx: usize) -> String {
        format!("#{idx} {}", self.line(idx).raw)
    }

    fn violation(&mut self, kind: &'static str, what: String, lines: Vec<String>) {
        self.out.violations.push(Violation { kind, what, lines });
    }

    fn hold_lines(&self, h: usize) -> Vec<String> {
        let hold = &self.holds[h];
        let mut idxs = vec![hold.open];
        idxs.extend(hold.ends.iter().map(|e| e.idx));
        idxs.extend(hold.reclaimed.map(|r| r.1));
        if let Some(lost) = hold.lost {
            idxs.push(lost.fault);
            if lost.until != usize::MAX {
                idxs.push(lost.until);
            }
        }
        idxs.sort_unstable();
        idxs.dedup();
        idxs.into_iter().map(|i| self.raw(i)).collect()
    }

    /// The next line after `idx` by `pid` satisfying `pred`, before that pid's next
    /// `tick` line (i.e. within the same tick).
    fn next_in_tick(&self, pid: u64, idx: usize, pred: impl Fn(&Line) -> bool) -> Option<&'a Line> {
        let own = self.by_pid.get(&pid)?;
        let from = own.partition_point(|&i| i <= idx);
        for &i in &own[from..] {
            let l = self.line(i);
            if l.ev() == "tick" {
                return None;
            }
            if pred(l) {
                return Some(l);
            }
        }
        None
    }

    /// The last line before `idx` by `pid` satisfying `pred`.
    fn prev_of(&self, pid: u64, idx: usize, pred: impl Fn(&Line) -> bool) -> Option<&'a Line> {
        let own = self.by_pid.get(&pid)?;
        let to = own.partition_point(|&i| i < idx);
        own[..to].iter().rev().map(|&i| self.line(i)).find(|l| pred(l))
    }

    fn set_lease(&mut self, h: usize, lease: u64, evidence: usize) {
        match self.holds[h].lease {
            Some(old) if old != lease => {
                let mut lines = self.hold_lines(h);
                lines.push(self.raw(evidence));
                let task = self.holds[h].task.clone();
                self.violation(
                    "one start, two leases",
                    format!("task {task}: one start seen with leases {old} and {lease}"),
                    lines,
                );
            }
            Some(_) => {}
            None => self.attach_lease(h, lease, evidence),
        }
    }

    fn attach_lease(&mut self, h: usize, lease: u64, evidence: usize) {
        self.holds[h].lease = Some(lease);
        if let Some(&other) = self.by_lease.get(&lease) {
            if other != h {
                let mut lines = self.hold_lines(other);
                lines.extend(self.hold_lines(h));
                lines.push(self.raw(evidence));
                self.violation(
                    "lease started twice",
                    format!("lease {lease} was started twice"),
                    lines,
                );
            }
        } else {
            self.by_lease.insert(lease, h);
        }
    }

    // ---------------------------------------------------------------------- passes

    fn holds_from_starts(&mut self) {
        let mut pids = BTreeSet::new();
        for l in self.lines {
            match l.ev() {
                "replica_boot" => {
                    pids.insert(l.pid());
                }
                "start_callback" => {
                    let h = self.holds.len();
                    self.holds.push(Hold {
                        task: l.task().to_owned(),
                        pid: l.pid(),
                        open: l.idx,
                        lease: None,
                        slot: l.str("slot").map(str::to_owned),
                        taken: l.v.get("taken").and_then(Value::as_bool).unwrap_or(true),
                        ends: Vec::new(),
                        reclaimed: None,
                        exempt: false,
                        lost: None,
                    });
                    self.by_task.entry(l.task().to_owned()).or_default().push(h);
                    if let Some(lease) = l.lease() {
                        self.attach_lease(h, lease, l.idx);
                    }
                }
                _ => {}
            }
        }
        self.out.stats.replicas = pids.len();
        self.out.stats.holds = self.holds.len();
        // The replica's report of the tick names lease and slot of what it started.
        for l in self.lines.iter().filter(|l| l.ev() == "start") {
            // Every start a replica reports names both (replica.rs logs them from
            // `SlotTask`): a line without them is a broken report, not a start to skip.
            let (Some(lease), Some(slot)) = (l.lease(), l.str("slot")) else {
                self.violation(
                    "start report without lease or slot",
                    format!("task {} reported started without its lease or slot", l.task()),
                    vec![self.raw(l.idx)],
                );
                continue;
            };
            let h = self.by_task.get(l.task()).and_then(|hs| {
                hs.iter()
                    .copied()
                    .filter(|&h| self.holds[h].pid == l.pid() && self.holds[h].open < l.idx)
                    .max_by_key(|&h| self.holds[h].open)
            });
            match h {
                Some(h) => {
                    self.holds[h].slot = Some(slot.to_owned());
                    self.set_lease(h, lease, l.idx);
                }
                None => self.violation(
                    "start report without start_callback",
                    format!("task {} reported started without a start_callback", l.task()),
                    vec![self.raw(l.idx)],
                ),
            }
        }
    }

    /// The hold a line about `task` under `lease` (if known) at `idx` belongs to.
    fn hold_for(&mut self, task: &str, lease: Option<u64>, idx: usize) -> Option<usize> {
        if let Some(lease) = lease {
            if let Some(&h) = self.by_lease.get(&lease) {
                return Some(h);
            }
        }
        let candidates = self.by_task.get(task)?;
        let h = candidates
            .iter()
            .copied()
            .filter(|&h| self.holds[h].open < idx)
            .filter(|&h| lease.is_none() || self.holds[h].lease.is_none())
            .max_by_key(|&h| self.holds[h].open)?;
        if let Some(lease) = lease {
            self.attach_lease(h, lease, idx);
        }
        Some(h)
    }

    fn ends(&mut self) {
        for l in self.lines {
            let kind = match l.ev() {
                "timeout_callback" => EndKind::Timeout,
                "stop_callback" => EndKind::Stop,
                _ => continue,
            };
            let (pid, task) = (l.pid(), l.task());
            // A sweep's callbacks (timeout_callback, then stop_callback, back to back)
            // are followed by the tick's timed_out report line; a stop's
            // stop_callback comes between its stop_sent and stop_result lines.
            let swept_lease = |at: usize| {
                self.next_in_tick(pid, at, |n| n.ev() == "timed_out" && n.task() == task)
                    .and_then(Line::lease)
            };
            // Callbacks log their lease (stop_with_lease / timeout_with_lease); older
            // histories without it are matched by position.
            let lease = l.lease().or_else(|| match kind {
                EndKind::Timeout => swept_lease(l.idx),
                EndKind::Stop => {
                    let prev = self.prev_of(pid, l.idx, |n| {
                        n.task() == task
                            && matches!(
                                n.ev(),
                                "timeout_callback" | "stop_sent" | "stop_result" | "stop_callback"
                            )
                    });
                    match prev {
                        Some(p) if p.ev() == "timeout_callback" => swept_lease(p.idx),
                        Some(p) if p.ev() == "stop_sent" => p.lease(),
                        _ => swept_lease(l.idx),
                    }
                }
            });
            if kind == EndKind::Timeout {
                self.out.stats.timeouts += 1;
            } else {
                self.out.stats.stops += 1;
            }
            match self.hold_for(task, lease, l.idx) {
                Some(h) => self.holds[h].ends.push(End {
                    idx: l.idx,
                    kind,
                    pid,
                }),
                // A claim whose start never ran: its sweep (one per claim) counts it.
                None if kind == EndKind::Timeout => self.out.stats.orphan_ends += 1,
                None => {}
            }
        }
    }

    /// `timed_out` and `reclaimed` report lines: at most one each per lease.
    fn reports(&mut self) {
        let mut seen: HashMap<(&str, u64), usize> = HashMap::new();
        for l in self.lines {
            let ev = l.ev();
            if ev != "timed_out" && ev != "reclaimed" {
                continue;
            }
            let Some(lease) = l.lease() else { continue };
            if let Some(first) = seen.insert((ev, lease), l.idx) {
                self.violation(
                    "sweep/reclaim reported twice",
                    format!("lease {lease} {ev} twice"),
                    vec![self.raw(first), self.raw(l.idx)],
                );
            }
            if let Some(&h) = self.by_lease.get(&lease) {
                if self.holds[h].task != l.task() {
                    let mut lines = self.hold_lines(h);
                    lines.push(self.raw(l.idx));
                    self.violation(
                        "lease of two tasks",
                        format!("lease {lease} reported for two tasks"),
                        lines,
                    );
                }
                if self.holds[h].slot.is_none() {
                    self.holds[h].slot = l.str("slot").map(str::to_owned);
                }
            }
            if ev == "reclaimed" {
                self.out.stats.reclaims += 1;
                // The reclaim happened in Redis after the replica's tick began.
                let tick = self
                    .prev_of(l.pid(), l.idx, |n| n.ev() == "tick")
                    .map_or(l.idx, |t| t.idx);
                match self.hold_for(l.task(), Some(lease), l.idx) {
                    Some(h) => {
                        let close = tick.max(self.holds[h].open);
                        self.holds[h].reclaimed = Some((close, l.idx));
                    }
                    None => self.out.stats.orphan_ends += 1,
                }
            }
        }
    }

    /// Data loss (`FLUSHALL`, `kill -9` of a Redis without persistence). The fault
    /// line carries Redis's time at the loss (`loss_ms`) and the lease counter then
    /// (`lease_at_loss`), both read atomically with the loss. A hold is of the lost
    /// generation when its lease is at most that counter and it has no end (an end
    /// callback after the fault line means Redis ended the hold before the loss);
    /// later leases are the new generation. For each loss:
    ///
    /// - the lost holds end in Redis at the fault and in the log as the module doc
    ///   says (which `live_counts` then checks);
    /// - a replica's tick reports `state_lost` after the fault;
    /// - no hold of the new generation starts before the quarantine ends: the loss +
    ///   the slot timeout, or the earliest `until_ms` a replica reported, whichever
    ///   is later (less a few ms for rounding);
    /// - every lease started after the fault is above every lease started before;
    /// - the new generation starts at all (work resumed).
    fn data_loss(&mut self) {
        const MARGIN_MS: u64 = 20;
        let losses: Vec<&'a Line> = self
            .lines
            .iter()
            .filter(|l| l.ev() == "fault")
            .filter(|l| match l.str("kind") {
                Some("flushall") => true,
                Some("redis_kill") => l.v.get("persistence").and_then(Value::as_bool) == Some(false),
                _ => false,
            })
            .collect();
        for (n, f) in losses.iter().enumerate() {
            let next = losses.get(n + 1).map_or(usize::MAX, |l| l.idx);
            let loss_ms = f.u64("loss_ms").unwrap_or_else(|| f.ms());
            let before = |h: &Hold| h.open < f.idx;
            let max_before = self
                .holds
                .iter()
                .filter(|h| before(h))
                .filter_map(|h| h.lease)
                .max();
            // Without the counter (unreadable at the fault) the holds logged before
            // the fault are the lost generation.
            let cut = f.u64("lease_at_loss").or(max_before);
            let old = |h: &Hold| match (h.lease, cut) {
                (Some(lease), Some(cut)) => lease <= cut,
                _ => before(h),
            };
            let end_ms = loss_ms + self.p.timeout_ms;
            let bound = self
                .lines
                .iter()
                .find(|l| l.idx > f.idx && l.ms() >= end_ms)
                .map_or(usize::MAX, |l| l.idx);
            // The lost generation.
            for h in 0..self.holds.len() {
                let hold = &self.holds[h];
                if hold.lost.is_some()
                    || hold.exempt
                    || !hold.ends.is_empty()
                    || hold.reclaimed.is_some()
                    || !old(hold)
                {
                    continue;
                }
                let learned = self
                    .lines
                    .iter()
                    .find(|l| {
                        l.idx > f.idx
                            && matches!(l.ev(), "keepalive_result" | "stop_result")
                            && l.task() == hold.task
                            && l.lease() == hold.lease
                            && matches!(l.str("result"), Some("wrong_task" | "expired" | "lease_lost"))
                    })
                    .map(|l| l.idx);
                // usize::MAX: the log ended first, the hold is live to its end.
                let until = learned.map_or(bound, |l| l.min(bound));
                self.out.stats.lost_holds += 1;
                if learned.is_some_and(|l| l < bound) {
                    self.out.stats.lost_learned += 1;
                }
                self.holds[h].lost = Some(Lost { fault: f.idx, until });
            }
            // Detected.
            let reports: Vec<&'a Line> = self
                .lines
                .iter()
                .filter(|l| l.idx > f.idx && l.idx < next && l.ev() == "state_lost")
                .collect();
            if reports.is_empty() {
                self.violation(
                    "data loss not detected",
                    format!("no replica reported state_lost after the fault at line {}", f.idx),
                    vec![self.raw(f.idx)],
                );
            }
            let reported = reports.iter().filter_map(|l| l.u64("until_ms")).min();
            // The quarantine runs from the new epoch's creation: a replica that notices
            // the loss after it ended reports no quarantine. Before its end, or with no
            // quarantine reported at all, that is a violation.
            let unquarantined: Vec<&&Line> = reports
                .iter()
                .filter(|l| l.u64("until_ms").is_none())
                .filter(|l| reported.is_none_or(|end| l.ms() + MARGIN_MS < end))
                .collect();
            if !reports.is_empty() && !unquarantined.is_empty() {
                let lines = unquarantined.iter().map(|l| self.raw(l.idx)).collect();
                self.violation(
                    "state lost without a quarantine",
                    "a tick reported state_lost without quarantined_until while one was due".into(),
                    lines,
                );
            }
            let quarantine_end = reported.unwrap_or(0).max(end_ms);
            // The new generation: no start in the quarantine, leases above the old.
            let after: Vec<usize> = (0..self.holds.len())
                .filter(|&h| self.holds[h].open > f.idx && self.holds[h].open < next)
                .collect();
            let mut resumed = false;
            for &h in &after {
                let hold = &self.holds[h];
                let (task, lease, is_old) = (hold.task.clone(), hold.lease, old(hold));
                let start = self.line(hold.open);
                if !is_old {
                    resumed = true;
                    if start.ms() + MARGIN_MS < quarantine_end {
                        let mut lines = vec![self.raw(f.idx)];
                        lines.extend(reports.first().map(|l| self.raw(l.idx)));
                        lines.extend(self.hold_lines(h));
                        self.violation(
                            "start during the quarantine",
                            format!(
                                "task {task} started {} ms after the loss, {} ms before the quarantine ended",
                                start.ms().saturating_sub(loss_ms),
                                quarantine_end - start.ms()
                            ),
                            lines,
                        );
                    }
                }
                if let (Some(lease), Some(max)) = (lease, max_before) {
                    if lease <= max {
                        let mut lines = vec![self.raw(f.idx)];
                        lines.extend(self.hold_lines(h));
                        self.violation(
                            "lease not above those before the loss",
                            format!("task {task} started after the loss with lease {lease}, not above {max}"),
                            lines,
                        );
                    }
                }
            }
            // Work resumed, unless the run was drained first (the harness leaves room).
            let drained_early = self
                .lines
                .iter()
                .find(|l| l.idx > f.idx && l.ev() == "drain")
                .is_some_and(|d| d.ms() < quarantine_end + 1000);
            if !resumed && !drained_early {
                self.violation(
                    "work did not resume after the loss",
                    format!(
                        "no task started after the quarantine of the fault at line {}",
                        f.idx
                    ),
                    vec![self.raw(f.idx)],
                );
            }
        }
    }

    /// Hand edits of slots: their holders may stay stuck; the slot must be reported
    /// and never handed out again.
    fn faults(&mut self) {
        let faults: Vec<&Line> = self.lines.iter().filter(|l| l.ev() == "fault").collect();
        self.out.stats.faults = faults.len();
        for f in faults {
            match f.str("kind") {
                Some("kill") => self.out.stats.kills += 1,
                Some("corrupt") => {
                    let slot = f.str("slot").unwrap_or_default().to_owned();
                    // The hold in the slot when it was edited.
                    let by_lease = f.lease().and_then(|lease| self.by_lease.get(&lease).copied());
                    let by_task = f.str("task").and_then(|task| {
                        let hs = self.by_task.get(task)?;
                        hs.iter().copied().filter(|&h| self.holds[h].open < f.idx).max()
                    });
                    if let Some(h) = by_lease.or(by_task) {
                        self.holds[h].exempt = true;
                        self.holds[h].slot = Some(slot.clone());
                    }
                    // A claim of the slot after the edit (its start_callback line
                    // follows the claim). The hold in the slot at the edit is exempt.
                    for h in 0..self.holds.len() {
                        let hold = &self.holds[h];
                        if hold.open > f.idx && hold.slot.as_deref() == Some(slot.as_str()) && !hold.exempt {
                            let mut lines = vec![self.raw(f.idx)];
                            lines.extend(self.hold_lines(h));
                            self.violation(
                                "corrupt slot handed out",
                                format!("slot {slot} handed out after it was corrupted"),
                                lines,
                            );
                        }
                    }
                    let reported = self.lines.iter().filter(|l| {
                        l.idx > f.idx
                            && l.ev() == "tick_error"
                            && l.str("stage") == Some("CorruptSlot")
                            && l.str("slot") == Some(slot.as_str())
                    });
                    let n = reported.count();
                    self.out.stats.corrupt_reports += n;
                    if n == 0 {
                        self.violation(
                            "corrupt slot not reported",
                            format!("corrupt slot {slot} was never reported by a tick"),
                            vec![self.raw(f.idx)],
                        );
                    }
                }
                _ => {}
            }
        }
    }

    fn per_hold(&mut self) {
        for h in 0..self.holds.len() {
            let hold = &self.holds[h];
            let task = hold.task.clone();
            // Callbacks run again by the replica that reclaimed the hold (at least
            // once, after the first run was cut short) are not counted twice.
            let first_run: Vec<&End> = hold
                .ends
                .iter()
                .filter(|e| hold.reclaimed.is_none_or(|(close, _)| e.idx <= close))
                .collect();
            let stops = first_run.iter().filter(|e| e.kind == EndKind::Stop).count();
            let timeouts = first_run.iter().filter(|e| e.kind == EndKind::Timeout).count();
            let first_stop = first_run.iter().find(|e| e.kind == EndKind::Stop).map(|e| e.idx);
            let late_timeout = first_run
                .iter()
                .any(|e| e.kind == EndKind::Timeout && first_stop.is_some_and(|s| e.idx > s));
            let never =
                hold.ends.is_empty() && hold.reclaimed.is_none() && !hold.exempt && hold.lost.is_none();
            let not_taken = !hold.taken;
            let enders: BTreeSet<u64> = hold.ends.iter().map(|e| e.pid).collect();
            if stops > 1 {
                self.violation(
                    "stop_callback twice",
                    format!("task {task}: stop_callback {stops} times for one start (replicas {enders:?})"),
                    self.hold_lines(h),
                );
            }
            if timeouts > 1 {
                self.violation(
                    "timeout_callback twice",
                    format!("task {task}: timeout_callback {timeouts} times for one start"),
                    self.hold_lines(h),
                );
            }
            if late_timeout {
                self.violation(
                    "timeout_callback after stop_callback",
                    format!("task {task}: timeout_callback after stop_callback"),
                    self.hold_lines(h),
                );
            }
            if never {
                self.violation(
                    "hold never ended",
                    format!("task {task}: started, never ended (no stop/timeout callback, no reclaim)"),
                    self.hold_lines(h),
                );
            }
            if not_taken {
                self.violation(
                    "start of a task not in the backlog",
                    format!("task {task}: start_callback for a task no longer in the backlog"),
                    self.hold_lines(h),
                );
            }
        }
    }

    /// A task id is started once: never twice at a time, never again after it ended.
    fn per_task(&mut self) {
        let tasks: Vec<(String, Vec<usize>)> =
            self.by_task.iter().map(|(t, h)| (t.clone(), h.clone())).collect();
        for (task, mut hs) in tasks {
            if hs.len() < 2 {
                continue;
            }
            hs.sort_by_key(|&h| self.holds[h].open);
            for pair in hs.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                let concurrent = self.holds[a].log_close().is_none_or(|c| c > self.holds[b].open);
                let what = if concurrent {
                    format!("task {task} started twice at once (two holds)")
                } else {
                    format!("task {task} restarted after it finished (stale poll accepted?)")
                };
                let mut lines = self.hold_lines(a);
                lines.extend(self.hold_lines(b));
                self.violation(
                    if concurrent {
                        "task started twice at once"
                    } else {
                        "task restarted after it finished"
                    },
                    what,
                    lines,
                );
            }
        }
    }

    /// No keepalive or stop sent after its hold ended may succeed; a stop that
    /// succeeded ran its stop_callback.
    fn calls(&mut self) {
        let mut sent: HashMap<(u64, String, &str), usize> = HashMap::new();
        for l in self.lines {
            let (call, is_result) = match l.ev() {
                "keepalive_sent" => ("keepalive", false),
                "stop_sent" => ("stop", false),
                "keepalive_result" => ("keepalive", true),
                "stop_result" => ("stop", true),
                _ => continue,
            };
            let key = (l.pid(), l.task().to_owned(), call);
            if !is_result {
                sent.insert(key, l.idx);
                continue;
            }
            let Some(&s) = sent.get(&key) else { continue };
            let result = l.str("result").unwrap_or("");
            if call == "keepalive" && result == "ok" {
                self.out.stats.keepalives_ok += 1;
            }
            let Some(h) = self.hold_for(l.task(), l.lease(), s) else {
                continue;
            };
            let ended_before = self.holds[h].close().is_some_and(|c| c < s);
            if ended_before && result == "ok" {
                let mut lines = self.hold_lines(h);
                lines.push(self.raw(s));
                lines.push(self.raw(l.idx));
                self.violation(
                    "call after its hold ended accepted",
                    format!(
                        "{call} of task {} sent after its hold ended was accepted",
                        l.task()
                    ),
                    lines,
                );
            } else if ended_before && matches!(result, "wrong_task" | "expired" | "lease_lost") {
                self.out.stats.stale_refused += 1;
            }
            if call == "stop" && result == "ok" {
                let ran = self.holds[h]
                    .ends
                    .iter()
                    .any(|e| e.kind == EndKind::Stop && e.pid == l.pid() && e.idx > s && e.idx < l.idx);
                if !ran {
                    let mut lines = self.hold_lines(h);
                    lines.push(self.raw(s));
                    lines.push(self.raw(l.idx));
                    self.violation(
                        "stop ok without stop_callback",
                        format!("stop of task {} succeeded without its stop_callback", l.task()),
                        lines,
                    );
                }
            }
        }
    }

    /// Redis as `inspect()` saw it against the log: a hold live in the log over the
    /// whole inspection is held in Redis, under its lease; a busy slot's lease has
    /// not ended in the log before the inspection began.
    fn inspections(&mut self) {
        let mut begins: HashMap<u64, usize> = HashMap::new();
        let corrupted: Vec<(usize, String)> = self
            .lines
            .iter()
            .filter(|l| l.ev() == "fault" && l.str("kind") == Some("corrupt"))
            .map(|l| (l.idx, l.str("slot").unwrap_or_default().to_owned()))
            .collect();
        for l in self.lines {
            match l.ev() {
                "inspect_begin" => {
                    begins.insert(l.u64("k").unwrap_or(0), l.idx);
                    continue;
                }
                "inspect" => {}
                _ => continue,
            }
            let Some(&begin) = begins.get(&l.u64("k").unwrap_or(0)) else {
                continue;
            };
            self.out.stats.inspections += 1;
            let slots: Vec<Value> =
                l.v.get("slots")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
            let mut held: HashMap<String, (String, String, Option<u64>)> = HashMap::new();
            let mut status_of: HashMap<String, String> = HashMap::new();
            for s in &slots {
                let slot = s.get("slot").and_then(Value::as_str).unwrap_or("").to_owned();
                let status = s.get("status").and_then(Value::as_str).unwrap_or("").to_owned();
                status_of.insert(slot.clone(), status.clone());
                if status == "corrupt" && !corrupted.iter().any(|(i, c)| *i < begin && *c == slot) {
                    self.violation(
                        "slot corrupt without a hand edit",
                        format!("slot {slot} is corrupt without a hand edit"),
                        vec![self.raw(l.idx)],
                    );
                }
                let Some(task) = s.get("task").and_then(Value::as_str) else {
                    continue;
                };
                let lease = s.get("lease").and_then(Value::as_u64);
                if let Some((other, _, _)) =
                    held.insert(task.to_owned(), (slot.clone(), status.clone(), lease))
                {
                    self.violation(
                        "Redis: task in two slots",
                        format!("Redis shows task {task} in two slots ({other} and {slot})"),
                        vec![self.raw(l.idx)],
                    );
                }
                let Some(lease) = lease else { continue };
                let Some(&h) = self.by_lease.get(&lease) else {
                    continue;
                };
                if self.holds[h].task != task {
                    let mut lines = self.hold_lines(h);
                    lines.push(self.raw(l.idx));
                    self.violation(
                        "Redis: lease of another task",
                        format!("Redis shows lease {lease} for task {task}, the log another task"),
                        lines,
                    );
                }
                match &self.holds[h].slot {
                    Some(known) if *known != slot => {
                        let mut lines = self.hold_lines(h);
                        lines.push(self.raw(l.idx));
                        self.violation(
                            "Redis: lease in another slot",
                            format!("Redis shows lease {lease} in slot {slot}, the log in {known}"),
                            lines,
                        );
                    }
                    Some(_) => {}
                    None => self.holds[h].slot = Some(slot.clone()),
                }
                if status == "busy" && self.holds[h].close().is_some_and(|c| c < begin) {
                    let mut lines = self.hold_lines(h);
                    lines.push(self.raw(begin));
                    lines.push(self.raw(l.idx));
                    self.violation(
                        "Redis: busy after its hold ended",
                        format!("Redis says slot {slot} is busy with lease {lease}, whose hold had ended"),
                        lines,
                    );
                }
            }
            for h in 0..self.holds.len() {
                let hold = &self.holds[h];
                if !hold.live_over(begin, l.idx) {
                    continue;
                }
                let ok = match held.get(&hold.task) {
                    Some((_, status, lease)) => {
                        (status == "busy" || status == "stopping")
                            && (hold.lease.is_none() || *lease == hold.lease)
                    }
                    None => {
                        hold.exempt
                            && hold
                                .slot
                                .as_ref()
                                .is_some_and(|s| status_of.get(s).is_some_and(|st| st == "corrupt"))
                    }
                };
                if !ok {
                    let task = hold.task.clone();
                    let found = held.get(&task).cloned();
                    let mut lines = self.hold_lines(h);
                    lines.push(self.raw(begin));
                    lines.push(self.raw(l.idx));
                    self.violation(
                        "held in the log, free in Redis",
                        format!("the log holds task {task} through an inspection; Redis shows {found:?}"),
                        lines,
                    );
                }
            }
        }
    }

    /// Never more than N holds live at once (in log order), and never two holds of
    /// one slot at once. A lost hold counts until its task knew or the quarantine
    /// ended (`log_close`).
    fn live_counts(&mut self) {
        let mut edges: Vec<(usize, i32, usize)> = Vec::new();
        for (h, hold) in self.holds.iter().enumerate() {
            let close = hold.log_close();
            if close.is_some_and(|c| c <= hold.open) {
                continue; // its start line was written after its end (a frozen replica)
            }
            edges.push((hold.open, 1, h));
            if let Some(c) = close {
                edges.push((c, -1, h));
            }
        }
        // Closes before opens at the same line (a line is never both).
        edges.sort_by_key(|&(i, d, _)| (i, d));
        let mut live: BTreeSet<usize> = BTreeSet::new();
        let mut over = false;
        let mut by_slot: HashMap<String, usize> = HashMap::new();
        for (idx, d, h) in edges {
            if d < 0 {
                live.remove(&h);
                if let Some(slot) = &self.holds[h].slot {
                    if by_slot.get(slot) == Some(&h) {
                        by_slot.remove(slot);
                    }
                }
                if live.len() <= self.p.slots {
                    over = false;
                }
                continue;
            }
            live.insert(h);
            self.out.stats.max_live = self.out.stats.max_live.max(live.len());
            if let Some(slot) = self.holds[h].slot.clone() {
                if let Some(other) = by_slot.insert(slot.clone(), h) {
                    if live.contains(&other) {
                        let mut lines = self.hold_lines(other);
                        lines.extend(self.hold_lines(h));
                        self.violation(
                            "slot held by two leases",
                            format!("slot {slot} held by two leases at once"),
                            lines,
                        );
                    }
                }
            }
            if live.len() > self.p.slots && !over {
                over = true;
                let mut lines = vec![self.raw(idx)];
                lines.extend(live.iter().map(|&h| self.raw(self.holds[h].open)));
                self.violation(
                    "more than N live holds",
                    format!("{} live holds at once with {} slots", live.len(), self.p.slots),
                    lines,
                );
            }
        }
    }

    /// A replica killed mid-run leaks no slot for longer than the slot's timeout: its
    /// holds, and a claim it made but never started, end within timeout + margin
    /// (measured on the parent's clock).
    fn leak_bounds(&mut self) {
        let Some(parent) = self.lines.iter().find(|l| l.ev() == "run_begin").map(Line::pid) else {
            return;
        };
        let parent_lines: Vec<&Line> = self.lines.iter().filter(|l| l.pid() == parent).collect();
        let kills: Vec<&Line> = self
            .lines
            .iter()
            .filter(|l| l.ev() == "fault" && l.str("kind") == Some("kill"))
            .collect();
        for k in kills {
            let Some(target) = k.u64("target") else { continue };
            let limit = k.ms() + self.p.timeout_ms + self.p.margin_ms;
            let Some(bound) = parent_lines.iter().find(|l| l.ms() >= limit).map(|l| l.idx) else {
                continue;
            };
            for h in 0..self.holds.len() {
                let hold = &self.holds[h];
                if hold.pid != target || hold.open > k.idx || hold.exempt {
                    continue;
                }
                if hold.close().is_some_and(|c| c < k.idx) {
                    continue;
                }
                if hold.close().is_none_or(|c| c > bound) {
                    let task = hold.task.clone();
                    let mut lines = self.hold_lines(h);
                    lines.push(self.raw(k.idx));
                    lines.push(self.raw(bound));
                    self.violation(
                        "leak after a kill",
                        format!(
                            "task {task} of killed replica {target} still held {} ms after the kill",
                            self.p.timeout_ms + self.p.margin_ms
                        ),
                        lines,
                    );
                }
            }
            // Claims in the window between claim and start_callback.
            let own = self.by_pid.get(&target).cloned().unwrap_or_default();
            let pending: Vec<&Line> = own
                .iter()
                .map(|&i| self.line(i))
                .filter(|l| l.ev() == "start_pending" && l.idx < k.idx)
                .filter(|p| {
                    !own.iter().map(|&i| self.line(i)).any(|n| {
                        n.idx > p.idx
                            && matches!(n.ev(), "start_callback" | "start_failed")
                            && n.task() == p.task()
                    })
                })
                .collect();
            for p in pending {
                let ended = self.lines.iter().find(|n| {
                    n.idx > p.idx
                        && n.task() == p.task()
                        && matches!(n.ev(), "timeout_callback" | "stop_callback" | "reclaimed")
                });
                if ended.is_none_or(|e| e.idx > bound) {
                    let mut lines = vec![self.raw(p.idx), self.raw(k.idx), self.raw(bound)];
                    lines.extend(ended.map(|e| self.raw(e.idx)));
                    self.violation("claim leak after a kill", 
                        format!(
                            "claim of task {} by killed replica {target} (start never ran) not timed out in time",
                            p.task()
                        ),
                        lines,
                    );
                }
            }
        }
    }

    /// After the drain: every hold ended and every slot idle, but hand-corrupted ones.
    fn final_state(&mut self) {
        let Some(fin) = self.lines.iter().rev().find(|l| l.ev() == "final") else {
            self.violation(
                "no final inspection",
                "the run has no final inspection".into(),
                vec![],
            );
            return;
        };
        let corrupted: BTreeSet<&str> = self
            .lines
            .iter()
            .filter(|l| l.ev() == "fault" && l.str("kind") == Some("corrupt"))
            .filter_map(|l| l.str("slot"))
            .collect();
        let slots = fin
            .v
            .get("slots")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut statuses: BTreeMap<String, String> = BTreeMap::new();
        for s in &slots {
            let slot = s.get("slot").and_then(Value::as_str).unwrap_or("").to_owned();
            let status = s.get("status").and_then(Value::as_str).unwrap_or("").to_owned();
            statuses.insert(slot, status);
        }
        for (slot, status) in &statuses {
            let want = if corrupted.contains(slot.as_str()) {
                "corrupt"
            } else {
                "idle"
            };
            if status != want {
                self.violation(
                    "final slot not idle",
                    format!("at the end slot {slot} is {status}, expected {want}"),
                    vec![self.raw(fin.idx)],
                );
            }
        }
        if statuses.len() != self.p.slots {
            self.violation(
                "final slot count",
                format!(
                    "the final inspection shows {} slots, expected {}",
                    statuses.len(),
                    self.p.slots
                ),
                vec![self.raw(fin.idx)],
            );
        }
    }
}
