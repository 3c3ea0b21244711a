//! A team of threads for the many short parallel passes of a decoding step.
//!
//! A SmolLM2 token from its GGUF blocks is ≈ 121 passes over weight rows (four per layer and the
//! output layer), each ≈ 25 µs on two cores. As rayon parallel iterators started from the
//! decoding thread, scratch counters inside one-row steps found ≈ 0.3 ms of a ≈ 3.9 ms step
//! between the passes and one core idle for ≈ 0.4 ms while the other finished its chunks
//! (docs/performance.md, "A team of threads for a step's passes"). Here the calling thread works
//! on every pass itself, beside the team's helper threads, which spin between passes (a pass
//! reaches them within a cache line's transfer) and go to sleep after [`SPIN`] without one.
//! Each participant owns a contiguous share of a pass's items and takes it in order, then takes
//! what is left of the others' shares from their ends (`for_each_mut`).
//!
//! One pass at a time: a caller that finds the team busy (another thread's pass, or a pass
//! started from inside one) runs its own alone, on its thread.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long a helper spins for the next pass before it goes to sleep: longer than the gaps
/// between a step's passes and between the steps of decoding, short enough that a helper does not
/// hold a core long after decoding stopped.
const SPIN: Duration = Duration::from_millis(1);

/// What every participant of a pass runs, given its index and the number of participants (it
/// claims its items itself).
type Routine<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// The shared state of the calling thread and the helpers.
struct Team {
    /// Helper threads that started (set once, when the team starts).
    helpers: AtomicUsize,
    /// Held for a pass: one at a time.
    pass: Mutex<()>,
    /// Incremented to start a pass; helpers wait for it to change.
    epoch: AtomicU64,
    /// The current pass's routine: written before `epoch`'s increment (release), read after
    /// seeing it (acquire), cleared after every helper finished the pass.
    routine: UnsafeCell<Option<*const Routine<'static>>>,
    /// Helpers done with the current pass.
    finished: AtomicUsize,
    /// Some helper's routine panicked in the current pass.
    panicked: AtomicBool,
    /// Helpers asleep or going to sleep, and what wakes them.
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `routine` is written only by the thread holding `pass`, while no helper reads it (all
// finished the previous pass), and read by helpers only between the epoch's increment and their
// `finished` increment, while the writer waits; the routine it points to is `Sync`.
unsafe impl Sync for Team {}

impl Team {
    /// The team of the process: one helper fewer than rayon's threads (`RAYON_NUM_THREADS`, else
    /// the cores), started on first use.
    fn get() -> &'static Team {
        static TEAM: OnceLock<&'static Team> = OnceLock::new();
        TEAM.get_or_init(|| {
            let team: &'static Team = Box::leak(Box::new(Team {
                helpers: AtomicUsize::new(0),
                pass: Mutex::new(()),
                epoch: AtomicU64::new(0),
                routine: UnsafeCell::new(None),
                finished: AtomicUsize::new(0),
                panicked: AtomicBool::new(false),
                sleepers: AtomicUsize::new(0),
                sleep: Mutex::new(()),
                wake: Condvar::new(),
            }));
            let wanted = rayon::current_num_threads().saturating_sub(1);
            let started = (0..wanted)
                .take_while(|&i| {
                    std::thread::Builder::new()
                        .name(format!("chorus-team-{i}"))
                        .spawn(move || team.helper(i + 1))
                        .is_ok()
                })
                .count();
            team.helpers.store(started, Ordering::Relaxed);
            team
        })
    }

    /// The life of helper `participant` (1, 2, …): wait for a pass, run its routine, count
    /// itself finished.
    fn helper(&self, participant: usize) {
        // The epoch the team started with: a pass posted before this thread first ran still
        // counts it among its helpers.
        let mut seen = 0;
        loop {
            seen = self.wait_for_pass(seen);
            // SAFETY: the pass's routine stays alive until this helper counts itself finished
            // (the caller waits for that before clearing it and returning).
            let routine = unsafe { (*self.routine.get()).map(|r| &*r) };
            let participants = self.helpers.load(Ordering::Relaxed) + 1;
            if let Some(routine) = routine
                && catch_unwind(AssertUnwindSafe(|| routine(participant, participants))).is_err()
            {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.finished.fetch_add(1, Ordering::Release);
        }
    }

    /// Spins until the epoch differs from `seen`, sleeping once [`SPIN`] passed; returns it.
    fn wait_for_pass(&self, seen: u64) -> u64 {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = self.epoch.load(Ordering::Acquire);
            if epoch != seen {
                return epoch;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && started.elapsed() > SPIN {
                // Announced before the epoch is read again under the lock; the caller reads
                // `sleepers` after incrementing the epoch (both sequentially consistent), so either
                // it sees this sleeper and notifies under the lock, or this read sees its epoch.
                self.sleepers.fetch_add(1, Ordering::SeqCst);
                let mut guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
                while self.epoch.load(Ordering::SeqCst) == seen {
                    guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                drop(guard);
                self.sleepers.fetch_sub(1, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Runs `routine` on this thread and on every helper, returning when all have finished it.
    fn run(&self, routine: &Routine<'_>) {
        let _pass = match self.pass.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return routine(0, 1),
        };
        let helpers = self.helpers.load(Ordering::Relaxed);
        if helpers == 0 {
            return routine(0, 1);
        }
        self.finished.store(0, Ordering::Relaxed);
        // SAFETY: only lifetimes differ; the pointer is cleared below, after every helper
        // finished with it, before `routine`'s borrow ends.
        let erased: *const Routine<'static> = unsafe { std::mem::transmute(routine) };
        // SAFETY: no helper reads `routine` now (all finished the previous pass: see below).
        unsafe { *self.routine.get() = Some(erased) };
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        let result = catch_unwind(AssertUnwindSafe(|| routine(0, helpers + 1)));
        let mut spins = 0u32;
        while self.finished.load(Ordering::Acquire) < helpers {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                // A helper may be waiting for a core (more threads than cores).
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: every helper finished this pass; none reads `routine` until the next one.
        unsafe { *self.routine.get() = None };
        let helper_panicked = self.panicked.swap(false, Ordering::Relaxed);
        if let Err(panic) = result {
            resume_unwind(panic);
        }
        if helper_panicked {
            panic!("a chorus team helper panicked in a parallel pass");
        }
    }
}

/// The threads a pass of [`for_each_mut`] runs on when the team is free: the caller and the
/// helpers.
pub(crate) fn participants() -> usize {
    Team::get().helpers.load(Ordering::Relaxed) + 1
}

/// A pointer to the items of [`for_each_mut`], shared by its participants.
struct Items<I>(*mut I);

// SAFETY: each item is claimed by exactly one participant (see `Share`), which alone touches it;
// items are `Send`.
unsafe impl<I: Send> Sync for Items<I> {}

/// One participant's share of the items, `front..back`, in one atomic word (front in the low
/// half): its owner claims from the front, in memory order; others, done with their own share,
/// claim from the back.
struct Share(AtomicU64);

impl Share {
    fn new(range: std::ops::Range<usize>) -> Self {
        Self(AtomicU64::new(
            range.start as u64 | (range.end as u64) << 32,
        ))
    }

    /// The next item from the front (`from_back`: the back), if any is left.
    fn claim(&self, from_back: bool) -> Option<usize> {
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let (front, back) = (current & 0xffff_ffff, current >> 32);
            if front >= back {
                return None;
            }
            let (next, item) = if from_back {
                (front | ((back - 1) << 32), back - 1)
            } else {
                ((front + 1) | (back << 32), front)
            };
            match self
                .0
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(item as usize),
                Err(seen) => current = seen,
            }
        }
    }
}

/// `f(state, item)` for every item, on the calling thread and the team's helpers (module docs),
/// each participant keeping one `state` from `init` for all the items it takes. Returns when every
/// item is done.
///
/// Each participant owns a contiguous share of the items and takes them in order — as the weight
/// rows lie in memory, which the hardware prefetchers follow: dealing out 30-row chunks one by
/// one to whichever thread asked next made a SmolLM2 step ≈ 1.7× slower — and, done with its own
/// share, takes what is left of the others' from their ends.
pub(crate) fn for_each_mut<I: Send, T>(
    items: &mut [I],
    init: impl Fn() -> T + Sync,
    f: impl Fn(&mut T, &mut I) + Sync,
) {
    let count = items.len();
    if count == 0 {
        return;
    }
    let team = Team::get();
    let planned = team.helpers.load(Ordering::Relaxed) + 1;
    assert!(count < 1 << 32, "team: {count} items");
    let shares: Vec<Share> = (0..planned)
        .map(|p| Share::new(p * count / planned..(p + 1) * count / planned))
        .collect();
    let shared = Items(items.as_mut_ptr());
    let routine = |participant: usize, participants: usize| {
        let (shared, shares) = (&shared, &shares);
        let mut state = None;
        // Alone (the team was busy), every share is taken from its front.
        let others = (1..planned).map(|k| (participant + k) % planned);
        let claims = std::iter::once((participant, false))
            .chain(others.map(|q| (q, participants > 1)))
            .flat_map(|(q, from_back)| std::iter::from_fn(move || shares[q].claim(from_back)));
        for i in claims {
            // SAFETY: `i < count` is in bounds and was claimed by this participant alone
            // (`Share::claim`); `items` stays mutably borrowed until every participant returned.
            let item = unsafe { &mut *shared.0.add(i) };
            f(state.get_or_insert_with(&init), item);
        }
    };
    if count == 1 {
        routine(0, 1);
    } else {
        team.run(&routine);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread of its own and fails if it has not returned after a minute — a pass
    /// that deadlocks fails its test instead of hanging the suite.
    fn finishes(what: &str, f: impl FnOnce() + Send + 'static) {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{what}: did not finish (a deadlock)"));
    }

    /// Whether this thread is one of the team's helpers.
    fn on_helper() -> bool {
        std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("chorus-team"))
    }

    #[test]
    fn every_item_is_visited_once_with_one_state_per_participant() {
        finishes("passes of 0 to 1000 items", || {
            for count in [0, 1, 2, 3, 17, 1000] {
                let mut items: Vec<(usize, u32)> = (0..count).map(|i| (i, 0)).collect();
                let states = AtomicUsize::new(0);
                for_each_mut(
                    &mut items,
                    || states.fetch_add(1, Ordering::Relaxed),
                    |_, (i, visits)| {
                        *visits += 1;
                        *i *= 3;
                    },
                );
                for (k, (i, visits)) in items.iter().enumerate() {
                    assert_eq!((*i, *visits), (3 * k, 1), "{count} items");
                }
                assert!(states.load(Ordering::Relaxed) <= participants());
            }
        });
    }

    /// Each participant of a pass gets its own index in `0..n` and the same count `n`, the
    /// caller and every helper: the shares of [`for_each_mut`] are dealt out by these. (Two
    /// participants with one index would both start on one share, which still visits each item
    /// once, so the test above cannot see it.)
    #[test]
    fn every_participant_of_a_pass_has_its_own_index_and_the_same_count() {
        finishes("passes that record their participants", || {
            let everyone = participants();
            let want: Vec<(usize, usize)> = (0..everyone).map(|p| (p, everyone)).collect();
            // Again while another test's pass held the team and this one ran alone.
            for _ in 0..1000 {
                let seen = Mutex::new(Vec::new());
                Team::get().run(&|participant, count| {
                    seen.lock().unwrap().push((participant, count));
                });
                let mut seen = seen.into_inner().unwrap();
                seen.sort_unstable();
                if seen == [(0, 1)] && everyone > 1 {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                assert_eq!(seen, want, "(participant, count) of a pass");
                return;
            }
            panic!("the team was busy for 1000 passes");
        });
    }

    /// Helpers that saw no pass for a while go to sleep instead of holding a core: after a
    /// decoding stops, its helpers must not spin on.
    #[test]
    fn helpers_without_a_pass_go_to_sleep() {
        if participants() < 2 {
            return;
        }
        finishes("helpers going to sleep", || {
            let team = Team::get();
            // Until no other test's pass kept them busy for 20 SPINs.
            let deadline = Instant::now() + Duration::from_secs(50);
            while Instant::now() < deadline {
                std::thread::sleep(SPIN * 20);
                if team.sleepers.load(Ordering::SeqCst) == team.helpers.load(Ordering::Relaxed) {
                    return;
                }
            }
            panic!("the helpers spun on without a pass for 50 s");
        });
    }

    #[test]
    fn passes_from_many_threads_at_once_and_nested_passes_finish() {
        finishes("concurrent and nested passes", || {
            std::thread::scope(|s| {
                for t in 0..4usize {
                    s.spawn(move || {
                        for round in 0..200usize {
                            let mut outer: Vec<usize> = (0..8).collect();
                            for_each_mut(
                                &mut outer,
                                || (),
                                |_, v| {
                                    let mut inner = vec![*v; 3];
                                    for_each_mut(&mut inner, || (), |_, w| *w += 1);
                                    *v = inner.iter().sum::<usize>() + t + round;
                                },
                            );
                            let want: Vec<usize> =
                                (0..8).map(|v| 3 * (v + 1) + t + round).collect();
                            assert_eq!(outer, want);
                        }
                    });
                }
            });
        });
    }

    #[test]
    fn a_panic_on_a_helper_or_the_caller_reaches_the_caller_and_the_team_works_after_it() {
        if participants() < 2 {
            return;
        }
        finishes("passes that panic", || {
            // Slow items, so that a helper takes some; again while another test's pass held the
            // team and this one ran alone.
            let mut items = vec![0u32; 64];
            let helper_took = AtomicBool::new(false);
            for _ in 0..100 {
                let helper = catch_unwind(AssertUnwindSafe(|| {
                    for_each_mut(
                        &mut items,
                        || (),
                        |_, _| {
                            std::thread::sleep(Duration::from_millis(1));
                            if on_helper() {
                                helper_took.store(true, Ordering::Relaxed);
                                panic!("a helper's item");
                            }
                        },
                    )
                }));
                if !helper_took.load(Ordering::Relaxed) {
                    assert!(helper.is_ok());
                    continue;
                }
                let message = helper.expect_err("the helpers' panic was lost");
                assert_eq!(
                    message.downcast_ref::<&str>(),
                    Some(&"a chorus team helper panicked in a parallel pass")
                );
                break;
            }
            assert!(
                helper_took.load(Ordering::Relaxed),
                "no helper took an item"
            );
            // Again until the caller took an item: descheduled right after it published the
            // pass, the caller may find every item taken by the helpers (CI's parallel tests).
            let caller_took = AtomicBool::new(false);
            for _ in 0..100 {
                let caller = catch_unwind(AssertUnwindSafe(|| {
                    for_each_mut(
                        &mut items,
                        || (),
                        |_, _| {
                            if !on_helper() {
                                caller_took.store(true, Ordering::Relaxed);
                                panic!("the caller's");
                            }
                        },
                    )
                }));
                if caller_took.load(Ordering::Relaxed) {
                    assert!(caller.is_err(), "the caller's panic was lost");
                    break;
                }
                assert!(caller.is_ok());
            }
            assert!(
                caller_took.load(Ordering::Relaxed),
                "the caller took no item"
            );
            let mut items = vec![1u32; 64];
            for_each_mut(&mut items, || (), |_, v| *v += 1);
            assert!(items.iter().all(|&v| v == 2));
        });
    }

    #[test]
    fn helpers_that_slept_wake_for_the_next_pass() {
        if participants() < 2 {
            return;
        }
        finishes("a pass after the helpers slept", || {
            // Again while another test's pass held the team and this one ran alone.
            for _ in 0..100 {
                std::thread::sleep(SPIN * 5);
                let helper_took = AtomicBool::new(false);
                let mut items = vec![0u32; 16];
                for_each_mut(
                    &mut items,
                    || (),
                    |_, v| {
                        std::thread::sleep(Duration::from_millis(1));
                        helper_took.fetch_or(on_helper(), Ordering::Relaxed);
                        *v += 1;
                    },
                );
                assert!(items.iter().all(|&v| v == 1));
                if helper_took.load(Ordering::Relaxed) {
                    return;
                }
            }
            panic!("no helper took an item of a pass after sleeping");
        });
    }
}
