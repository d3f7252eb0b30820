//! A device whose operations a test can hold and release, to reproduce races in order.
//!
//! A [`Gate`] matches operations by kind and byte range. A matching operation stops at the
//! gate *before* touching the inner device (so a held read returns what the device holds
//! when it is released, the worst case for a read in flight) until the test calls
//! [`Gate::release`]. [`Gate::wait_arrived`] blocks until a given number of operations are
//! held, so a test knows a request has reached the point it wants, without sleeping.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::{BlockDevice, Fua, OpKind};
use crate::error::Result;

#[derive(Debug, Default)]
struct GateState {
    arrived: u64,
    released: bool,
}

#[derive(Debug)]
struct GateInner {
    kind: OpKind,
    start: u64,
    end: u64,
    /// Only the first `limit` matching operations are held; later ones pass.
    limit: u64,
    state: Mutex<GateState>,
    cv: Condvar,
}

/// A test's handle on a gate of a [`GatedDevice`].
#[derive(Clone, Debug)]
pub struct Gate(Arc<GateInner>);

impl Gate {
    /// Blocks until at least `n` operations have arrived at the gate.
    pub fn wait_arrived(&self, n: u64) {
        let mut st = self.0.state.lock();
        while st.arrived < n {
            self.0.cv.wait(&mut st);
        }
    }

    /// How many operations have arrived so far.
    pub fn arrived(&self) -> u64 {
        self.0.state.lock().arrived
    }

    /// Opens the gate: held operations go on, and later ones pass.
    pub fn release(&self) {
        let mut st = self.0.state.lock();
        st.released = true;
        self.0.cv.notify_all();
    }
}

/// A device that holds chosen operations at gates.
#[derive(Debug)]
pub struct GatedDevice {
    inner: Arc<dyn BlockDevice>,
    gates: Mutex<Vec<Arc<GateInner>>>,
}

impl GatedDevice {
    /// Wraps `inner` with no gates.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        GatedDevice {
            inner,
            gates: Mutex::new(Vec::new()),
        }
    }

    /// Adds a gate that holds the first `limit` operations of `kind` overlapping
    /// `start..end` (bytes; flushes match any range).
    pub fn gate(&self, kind: OpKind, start: u64, end: u64, limit: u64) -> Gate {
        let g = Arc::new(GateInner {
            kind,
            start,
            end,
            limit,
            state: Mutex::new(GateState::default()),
            cv: Condvar::new(),
        });
        self.gates.lock().push(g.clone());
        Gate(g)
    }

    fn pass(&self, kind: OpKind, offset: u64, len: u64) {
        let gate = {
            let gates = self.gates.lock();
            gates
                .iter()
                .find(|g| {
                    g.kind == kind
                        && (kind == OpKind::Flush || (offset < g.end && offset + len > g.start))
                        && {
                            let st = g.state.lock();
                            !st.released && st.arrived < g.limit
                        }
                })
                .cloned()
        };
        if let Some(g) = gate {
            let mut st = g.state.lock();
            if st.released || st.arrived >= g.limit {
                return;
            }
            st.arrived += 1;
            g.cv.notify_all();
            while !st.released {
                g.cv.wait(&mut st);
            }
        }
    }
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.pass(OpKind::Read, offset, buf.len() as u64);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: Fua) -> Result<()> {
        self.pass(OpKind::Write, offset, buf.len() as u64);
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        self.pass(OpKind::Flush, 0, 0);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.pass(OpKind::Write, offset, len);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: Fua) -> Result<()> {
        self.pass(OpKind::Write, offset, len);
        self.inner.write_zeroes(offset, len, fua)
    }
    fn describe(&self) -> String {
        format!("gated({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDevice;

    #[test]
    fn gate_holds_until_released() {
        let d = Arc::new(GatedDevice::new(Arc::new(MemDevice::new(8192))));
        let g = d.gate(OpKind::Write, 0, 512, 1);
        let d2 = d.clone();
        let t = std::thread::spawn(move || d2.write_at(&[9u8; 512], 0, Fua::No));
        g.wait_arrived(1);
        let mut b = [0u8; 512];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0u8; 512], "held write must not have happened");
        // A second write passes: the gate holds only one.
        d.write_at(&[1u8; 512], 4096, Fua::No).unwrap();
        g.release();
        t.join().unwrap().unwrap();
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [9u8; 512]);
    }
}
