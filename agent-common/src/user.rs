//! The user side of the flow maps (feature `user`): how hearth's poller, the sensor benchmark and the
//! kernel test load the object and read `FLOWS` with `FLOW_INFO`, in one place.

extern crate std;

use std::collections::{HashMap as StdHashMap, HashSet};
use std::io;
use std::vec::Vec;

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap};
use aya::{Ebpf, EbpfLoader};

use crate::{flows_capacity, names, FlowInfo, FlowKey, PacketCounts};

/// Errors of [`FlowMaps`] and [`size_flows`], naming the map.
#[derive(Debug, thiserror::Error)]
pub enum FlowMapsError {
    #[error("the eBPF object has no map {0}")]
    Missing(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("counting the possible CPUs ({path}): {source}")]
    Cpus {
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Sets the number of entries of `FLOWS` for this host's possible CPUs ([`flows_capacity`]), before
/// `load`. Returns the capacity set.
pub fn size_flows(loader: &mut EbpfLoader<'_>) -> Result<u32, FlowMapsError> {
    let cpus =
        aya::util::nr_cpus().map_err(|(path, source)| FlowMapsError::Cpus { path, source })?;
    let capacity = flows_capacity(u32::try_from(cpus).unwrap_or(u32::MAX));
    loader.map_max_entries(names::FLOWS, capacity);
    Ok(capacity)
}

/// One flow: what it is and its counters, added up over the CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The socket's cookie, the key of both maps.
    pub cookie: u64,
    pub info: FlowInfo,
    pub counts: PacketCounts,
}

/// A reading of every flow.
#[derive(Debug, Default)]
pub struct Reading {
    pub flows: Vec<Flow>,
    /// `FLOWS` entries without their `FLOW_INFO` (the kernel's LRU evicted it): deleted, so that
    /// the socket's next packet creates both again.
    pub orphans: usize,
}

/// One address pair's counters in a reading, with the earliest start among its sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressCounts {
    pub key: FlowKey,
    pub counts: PacketCounts,
    pub first_seen_ns: u64,
}

impl Reading {
    /// The flows per address pair, in the order first seen: two sockets with the same addresses (a
    /// closed one not deleted yet and a new one reusing its ports) are added up, so that whoever
    /// tracks flows by address sees one set of counters.
    pub fn by_address(&self) -> Vec<AddressCounts> {
        let mut index: StdHashMap<FlowKey, usize> = StdHashMap::with_capacity(self.flows.len());
        let mut out: Vec<AddressCounts> = Vec::with_capacity(self.flows.len());
        for f in &self.flows {
            match index.get(&f.info.key) {
                Some(&i) => {
                    let a = &mut out[i];
                    a.counts.add(&f.counts);
                    a.first_seen_ns = a.first_seen_ns.min(f.info.first_seen_ns);
                }
                None => {
                    index.insert(f.info.key, out.len());
                    out.push(AddressCounts {
                        key: f.info.key,
                        counts: f.counts,
                        first_seen_ns: f.info.first_seen_ns,
                    });
                }
            }
        }
        out
    }

    /// The cookies of the flows with one of these addresses (a closed connection's: its close
    /// event names its addresses, not its socket).
    pub fn cookies_of<'a>(&'a self, keys: &'a HashSet<FlowKey>) -> impl Iterator<Item = u64> + 'a {
        self.flows
            .iter()
            .filter(|f| keys.contains(&f.info.key))
            .map(|f| f.cookie)
    }
}

/// `FLOWS` (per-CPU counters by socket cookie) and `FLOW_INFO` (addresses and start by cookie),
/// taken out of the loaded object.
pub struct FlowMaps {
    counts: PerCpuHashMap<MapData, u64, PacketCounts>,
    info: HashMap<MapData, u64, FlowInfo>,
}

/// Takes map `name` out of the loaded object as the typed map `T`.
fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, FlowMapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(FlowMapsError::Missing(name))?;
    T::try_from(map).map_err(|source| FlowMapsError::Map { map: name, source })
}

impl FlowMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<FlowMaps, FlowMapsError> {
        Ok(FlowMaps {
            counts: take_map(ebpf, names::FLOWS)?,
            info: take_map(ebpf, names::FLOW_INFO)?,
        })
    }

    /// Every flow with its counters, each once. An entry evicted or deleted between the key walk and
    /// its lookup is skipped. The kernel's key walk starts over from the first key when the key it
    /// continues from was deleted meanwhile (the LRU evicts while new connections arrive), so an
    /// entry can come twice: only its first reading is kept.
    pub fn read(&mut self) -> Reading {
        let mut reading = Reading::default();
        let mut orphans = Vec::new();
        let mut seen = HashSet::new();
        for (cookie, per_cpu) in self.counts.iter().filter_map(Result::ok) {
            if !seen.insert(cookie) {
                continue;
            }
            let mut counts = PacketCounts::default();
            for c in per_cpu.iter() {
                counts.add(c);
            }
            match self.info.get(&cookie, 0) {
                Ok(info) => reading.flows.push(Flow {
                    cookie,
                    info,
                    counts,
                }),
                Err(_) => orphans.push(cookie),
            }
        }
        for cookie in &orphans {
            let _ = self.counts.remove(cookie);
        }
        reading.orphans = orphans.len();
        reading
    }

    /// Deletes a flow from both maps; one already gone is fine.
    pub fn remove(&mut self, cookie: u64) {
        let _ = self.counts.remove(&cookie);
        let _ = self.info.remove(&cookie);
    }

    /// Entries of `FLOWS` and of `FLOW_INFO` (a key walk each).
    pub fn entries(&self) -> (usize, usize) {
        (self.counts.keys().count(), self.info.keys().count())
    }
}

/// `EVENTS_LOST`: how many open/close events the kernel could not queue because the ring buffer was
/// full (one counter per CPU).
pub struct LostEvents {
    map: PerCpuArray<MapData, u64>,
}

impl LostEvents {
    pub fn take(ebpf: &mut Ebpf) -> Result<LostEvents, FlowMapsError> {
        Ok(LostEvents {
            map: take_map(ebpf, names::EVENTS_LOST)?,
        })
    }

    /// The total since the programs were loaded, over every CPU.
    pub fn total(&self) -> Result<u64, FlowMapsError> {
        let per_cpu = self.map.get(&0, 0).map_err(|source| FlowMapsError::Map {
            map: names::EVENTS_LOST,
            source,
        })?;
        Ok(per_cpu.iter().fold(0u64, |a, n| a.wrapping_add(*n)))
    }
}

#[cfg(test)]
mod tests {
    use super::std::vec;
    use super::std::vec::Vec;
    use super::{Flow, HashSet, Reading};
    use crate::{FlowInfo, FlowKey, PacketCounts, AF_INET};

    fn key(remote_port: u16) -> FlowKey {
        FlowKey {
            local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            local_port: 18789,
            remote_port,
            family: AF_INET,
            _pad: 0,
        }
    }

    fn flow(cookie: u64, remote_port: u16, first: u64, bytes_in: u64) -> Flow {
        Flow {
            cookie,
            info: FlowInfo {
                key: key(remote_port),
                first_seen_ns: first,
            },
            counts: PacketCounts {
                bytes_in,
                bytes_out: 1,
                packets_in: 1,
                packets_out: 1,
            },
        }
    }

    #[test]
    fn sockets_with_the_same_addresses_are_added_up() {
        let reading = Reading {
            flows: vec![
                flow(7, 40000, 50, 100),
                flow(8, 40001, 60, 5),
                flow(9, 40000, 30, 20),
            ],
            orphans: 0,
        };
        let by = reading.by_address();
        assert_eq!(by.len(), 2);
        assert_eq!(by[0].key, key(40000));
        assert_eq!(by[0].counts.bytes_in, 120);
        assert_eq!(by[0].counts.packets_in, 2);
        assert_eq!(by[0].first_seen_ns, 30, "the earliest start");
        assert_eq!(by[1].key, key(40001));
        assert_eq!(by[1].counts.bytes_in, 5);
        let closed = HashSet::from([key(40000)]);
        let cookies: Vec<u64> = reading.cookies_of(&closed).collect();
        assert_eq!(cookies, vec![7, 9]);
    }
}
