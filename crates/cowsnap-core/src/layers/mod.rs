//! Stackable device-mapper-like targets: each layer is a [`BlockDevice`] over the device
//! below it, described by a [`LayerSpec`] that the pool records and a CLI flag parses.
//!
//! * `linear`: a range of the device below;
//! * `test-error`: EIO over a range (dm-error, restricted to a range);
//! * `test-zero`: reads zeros, drops writes (dm-zero);
//! * `test-flakey`: works for a period, then fails in a chosen way for a period (dm-flakey),
//!   periods counted in operations (deterministic) or milliseconds;
//! * `test-dust`: emulated bad blocks, changed at run time by messages (dm-dust);
//! * `test-delay`: sleeps before each operation (dm-delay).
//!
//! A stack is built bottom-up with [`build_stack`]; each [`Layer`] reports its current
//! [`spec`](Layer::spec), a dm-like [`status`](Layer::status) and takes
//! [`message`](Layer::message)s as `dmsetup message` does. Every layer is thread-safe,
//! checks every request with [`check_request`](crate::dev::check_request) and answers
//! injected failures with an [`Error::Io`] of errno `EIO` naming itself
//! (`test-dust over PATH`).

mod delay;
mod dust;
mod error;
mod flakey;
mod linear;
mod spec;
mod zero;

use std::io;
use std::sync::Arc;

pub use spec::{Direction, FlakeyMode, LayerSpec, Period, MAX_DUST_BLOCK_SECTORS, TARGETS};

use crate::dev::BlockDevice;
use crate::error::{Error, Result};

/// A layer of a stack: a block device over another, with dm-like parameters, status and
/// messages.
pub trait Layer: BlockDevice {
    /// The current parameters, for the pool to record (a dust layer reports its current bad
    /// blocks and whether it is enabled).
    fn spec(&self) -> LayerSpec;

    /// A dm-like status line, e.g. `enabled 3 bad blocks ...` or `up 12/100 ops ...`.
    fn status(&self) -> String;

    /// The status as JSON: `{"target": NAME, ...}` with the layer's state and counters.
    fn status_json(&self) -> serde_json::Value;

    /// The `dmsetup message` equivalent: returns the reply (may be empty). An unknown
    /// message is an [`Error::InvalidArgument`] listing the messages this target accepts.
    fn message(&self, words: &[&str]) -> Result<String>;

    /// This layer as a plain block device (to stack another layer on it).
    fn as_device(self: Arc<Self>) -> Arc<dyn BlockDevice>;
}

impl LayerSpec {
    /// Builds the layer over `below`; an error when the spec does not fit it
    /// ([`size_over`](Self::size_over)).
    pub fn build(&self, below: Arc<dyn BlockDevice>) -> Result<Arc<dyn Layer>> {
        let size = self.size_over(below.size())?;
        let layer: Arc<dyn Layer> = match self {
            LayerSpec::Linear { start, sectors } => {
                Arc::new(linear::Linear::new(below, *start, *sectors))
            }
            LayerSpec::TestError { start, sectors } => {
                Arc::new(error::ErrorLayer::new(below, *start, *sectors))
            }
            LayerSpec::TestZero => Arc::new(zero::Zero::new(below)),
            LayerSpec::TestFlakey { up, down, mode } => {
                Arc::new(flakey::Flakey::new(below, *up, *down, *mode))
            }
            LayerSpec::TestDust {
                block_sectors,
                bad,
                enabled,
            } => Arc::new(dust::Dust::new(below, *block_sectors, bad, *enabled)),
            LayerSpec::TestDelay {
                read_us,
                write_us,
                flush_us,
            } => Arc::new(delay::Delay::new(below, *read_us, *write_us, *flush_us)),
        };
        debug_assert_eq!(layer.size(), size);
        Ok(layer)
    }
}

/// A built stack: the top device and the layers, bottom first.
pub type Stack = (Arc<dyn BlockDevice>, Vec<Arc<dyn Layer>>);

/// Builds a whole stack bottom-up: `base`, then each spec in order. Returns the top device
/// and the layers (bottom first). With no specs the top is `base` itself.
pub fn build_stack(base: Arc<dyn BlockDevice>, specs: &[LayerSpec]) -> Result<Stack> {
    let mut top = base;
    let mut layers = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let layer = spec.build(top).map_err(|e| match e {
            Error::InvalidArgument(msg) => {
                Error::InvalidArgument(format!("layer {} ({}): {msg}", i + 1, spec.target_name()))
            }
            other => other,
        })?;
        top = Arc::clone(&layer).as_device();
        layers.push(layer);
    }
    Ok((top, layers))
}

/// An injected failure: [`Error::Io`] with errno `EIO`, on `device` (a layer's `describe`).
pub(crate) fn eio(op: &'static str, offset: u64, device: String) -> Error {
    Error::io(op, offset, device, io::Error::from_raw_os_error(libc::EIO))
}

/// The answer of a target that takes no message.
pub(crate) fn no_messages(target: &str, words: &[&str]) -> Error {
    Error::InvalidArgument(format!(
        "{target} accepts no messages (got {:?})",
        words.join(" ")
    ))
}

/// The answer to a message a target does not know, listing those it does.
pub(crate) fn unknown_message(target: &str, words: &[&str], known: &str) -> Error {
    Error::InvalidArgument(format!(
        "{target}: unknown message {:?}; messages: {known}",
        words.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{Fua, MemDevice};

    fn mem(bytes: u64) -> Arc<dyn BlockDevice> {
        Arc::new(MemDevice::new(bytes))
    }

    #[test]
    fn a_stack_of_three_layers_maps_and_fails_through_every_layer() {
        let base = Arc::new(MemDevice::new(1 << 20));
        let specs = [
            LayerSpec::Linear {
                start: 64,
                sectors: 128,
            },
            LayerSpec::parse("test-dust 8 1 2 enabled").unwrap(),
            LayerSpec::parse("test-delay 0 0 0").unwrap(),
        ];
        let (top, layers) = build_stack(base.clone(), &specs).unwrap();
        assert_eq!(top.size(), 128 * 512);
        assert_eq!(layers.len(), 3);
        let names: Vec<_> = layers.iter().map(|l| l.spec().target_name()).collect();
        assert_eq!(names, ["linear", "test-dust", "test-delay"]);
        assert_eq!(
            top.describe(),
            "test-delay over test-dust over linear over memory"
        );
        // A write through the stack lands at sector 64 + 1 of the base.
        top.write_at(&[7u8; 512], 512, Fua::No).unwrap();
        let mut b = [0u8; 512];
        base.read_at(&mut b, 65 * 512).unwrap();
        assert_eq!(b, [7u8; 512]);
        // Dust block 2 (sectors 16..24 of the linear layer) fails through the delay layer.
        let e = top.read_at(&mut b, 16 * 512).unwrap_err();
        assert_eq!(e.errno(), 5);
        assert!(
            e.to_string().contains("test-dust over linear over memory"),
            "{e}"
        );
        // A message to the dust layer changes what the top sees.
        layers[1].message(&["disable"]).unwrap();
        top.read_at(&mut b, 16 * 512).unwrap();
        assert_eq!(
            layers[1].spec(),
            LayerSpec::TestDust {
                block_sectors: 8,
                bad: vec![2],
                enabled: false
            }
        );
    }

    #[test]
    fn build_stack_names_the_layer_that_does_not_fit() {
        let specs = [
            LayerSpec::Linear {
                start: 0,
                sectors: 8,
            },
            LayerSpec::Linear {
                start: 4,
                sectors: 8,
            },
        ];
        let e = build_stack(mem(8192), &specs).unwrap_err();
        assert!(e.to_string().starts_with("layer 2 (linear): "), "{e}");
        let (top, layers) = build_stack(mem(8192), &[]).unwrap();
        assert_eq!(top.size(), 8192);
        assert!(layers.is_empty());
    }

    #[test]
    fn every_layer_checks_requests_and_reports_status() {
        for line in [
            "linear 0 16",
            "test-error 2 2",
            "test-zero",
            "test-flakey 5 5",
            "test-dust 2",
            "test-delay 0",
        ] {
            let spec = LayerSpec::parse(line).unwrap();
            let layer = spec.build(mem(8192)).unwrap();
            assert_eq!(layer.spec(), spec);
            let mut b = [0u8; 512];
            assert!(matches!(
                layer.read_at(&mut b, 8192),
                Err(Error::OutOfRange { .. })
            ));
            assert!(matches!(
                layer.write_at(&b, 1, Fua::No),
                Err(Error::Misaligned { .. })
            ));
            assert!(matches!(
                layer.write_zeroes(4096, 8192, Fua::No),
                Err(Error::OutOfRange { .. })
            ));
            assert!(matches!(
                layer.discard(0, 100),
                Err(Error::Misaligned { .. })
            ));
            let json = layer.status_json();
            assert_eq!(json["target"], spec.target_name(), "{json}");
            let _ = layer.status();
            assert!(layer.describe().ends_with(" over memory"));
            let e = layer.message(&["no-such-message"]).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{line}: {e:?}");
            let e = layer.message(&[]).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{line}: {e:?}");
        }
    }

    #[test]
    fn many_threads_through_dust_and_flakey_never_panic() {
        let specs = [
            LayerSpec::parse("test-dust 1 4 1 3 5 7 enabled").unwrap(),
            LayerSpec::parse("test-flakey 7 3 1 drop_writes").unwrap(),
        ];
        let (top, layers) = build_stack(mem(64 * 512), &specs).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let top = &top;
                let layers = &layers;
                s.spawn(move || {
                    let mut b = vec![0u8; 1024];
                    for i in 0..300u64 {
                        let off = ((t * 7 + i * 13) % 63) * 512;
                        let _ = match i % 5 {
                            0 => top.write_at(&b, off, Fua::No),
                            1 => top.flush(),
                            2 => top.write_zeroes(off, 512, Fua::Yes),
                            _ => top.read_at(&mut b, off),
                        };
                        if i % 50 == 0 {
                            let block = (i + t) % 64;
                            let block = block.to_string();
                            let _ = layers[0].message(&["addbadblock", &block, "1"]);
                            let _ = layers[0].message(&["removebadblock", &block]);
                            let _ =
                                layers[1].message(&[if t % 2 == 0 { "down" } else { "resume" }]);
                            let _ = layers[0].status();
                            let _ = layers[1].status_json();
                        }
                    }
                });
            }
        });
        let _ = layers[0].message(&["listbadblocks"]).unwrap();
    }
}
