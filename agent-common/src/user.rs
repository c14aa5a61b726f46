//! The user side of the flow maps (feature `user`): how hearth's poller, the sensor benchmark and the
//! kernel test load the object and read `FLOWS` with `FLOW_INFO`, in one place.

extern crate std;

use std::io;
use std::vec::Vec;

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap};
use aya::{Ebpf, EbpfLoader};

use crate::{flows_capacity, names, FlowInfo, PacketCounts};

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

/// `FLOWS` (per-CPU counters by socket cookie) and `FLOW_INFO` (addresses and start by cookie),
/// taken out of the loaded object.
pub struct FlowMaps {
    counts: PerCpuHashMap<MapData, u64, PacketCounts>,
    info: HashMap<MapData, u64, FlowInfo>,
}

impl FlowMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<FlowMaps, FlowMapsError> {
        let counts = ebpf
            .take_map(names::FLOWS)
            .ok_or(FlowMapsError::Missing(names::FLOWS))?;
        let info = ebpf
            .take_map(names::FLOW_INFO)
            .ok_or(FlowMapsError::Missing(names::FLOW_INFO))?;
        Ok(FlowMaps {
            counts: PerCpuHashMap::try_from(counts).map_err(|source| FlowMapsError::Map {
                map: names::FLOWS,
                source,
            })?,
            info: HashMap::try_from(info).map_err(|source| FlowMapsError::Map {
                map: names::FLOW_INFO,
                source,
            })?,
        })
    }

    /// Every flow with its counters. An entry evicted or deleted between the key walk and its lookup
    /// is skipped.
    pub fn read(&mut self) -> Reading {
        let mut reading = Reading::default();
        let mut orphans = Vec::new();
        for (cookie, per_cpu) in self.counts.iter().filter_map(Result::ok) {
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
