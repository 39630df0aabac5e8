//! Fault injection at the engine's entry points and inside its copy loops, so tests can prove
//! that a native error or panic never reaches the host worker and never leaves a slot reserved or
//! a block pinned. Off by default; the check is one relaxed atomic load.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::{CoreError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    Lookup,
    Store,
    Load,
    /// Before each block a store copies into its reserved slot.
    StoreCopy,
    /// Before each block a load copies out of its pinned slot.
    LoadCopy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None = 0,
    Error = 1,
    Panic = 2,
    /// At `LoadCopy` only: the load writes junk into the destination block, then stops there, as
    /// a copy torn midway would. Tests use it so that KV computed over a failed load is visibly
    /// wrong (a failed load otherwise leaves whatever the block held, often the right KV).
    Garbage = 3,
    /// The call waits while the fault stays `Hold`, then goes on as the fault then set says:
    /// tests hold a load thread to see that whatever waits for its copies waits.
    Hold = 4,
}

static FAULTS: [AtomicU8; 5] = [const { AtomicU8::new(0) }; 5];

impl FaultPoint {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "lookup" => Some(Self::Lookup),
            "store" => Some(Self::Store),
            "load" => Some(Self::Load),
            "store_copy" => Some(Self::StoreCopy),
            "load_copy" => Some(Self::LoadCopy),
            _ => None,
        }
    }
}

impl Fault {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Self::None),
            "error" => Some(Self::Error),
            "panic" => Some(Self::Panic),
            "garbage" => Some(Self::Garbage),
            "hold" => Some(Self::Hold),
            _ => None,
        }
    }
}

/// Makes every later call through `point` fail with `fault` (process-wide) until reset with `Fault::None`.
pub fn inject(point: FaultPoint, fault: Fault) {
    FAULTS[point as usize].store(fault as u8, Ordering::Relaxed);
}

/// Called at each fault point.
pub fn check(point: FaultPoint) -> Result<()> {
    loop {
        return match FAULTS[point as usize].load(Ordering::Relaxed) {
            0 => Ok(()),
            1 | 3 => Err(CoreError::Cache(format!("injected fault at {point:?}"))),
            4 => {
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            _ => panic!("injected panic at {point:?}"),
        };
    }
}

/// Whether `point` is to write junk before it fails (`Fault::Garbage`).
pub fn garbage(point: FaultPoint) -> bool {
    FAULTS[point as usize].load(Ordering::Relaxed) == Fault::Garbage as u8
}
