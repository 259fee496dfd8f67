//! The address pool job networks take their subnets from (`docker.network_pool`): IPv4 CIDRs,
//! and the choice of a free /24 among the subnets other networks use. Pure: the settings check
//! the pool at load without Docker.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// `docker.network` value that gives every job a network of its own (the default).
pub const MODE_JOB: &str = "job";
/// Every job gets a /24 of the pool: 253 addresses, more than a job and its services need.
pub const JOB_PREFIX: u8 = 24;
/// The pool when `docker.network_pool` is not set: 256 job networks at once.
pub const DEFAULT_POOL: &str = "10.213.0.0/16";

/// An IPv4 address range in CIDR form, `a.b.c.d/prefix`, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    base: u32,
    prefix: u8,
}

impl Cidr {
    fn first(self) -> u32 {
        self.base
    }
    fn last(self) -> u32 {
        self.base | (u32::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0))
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not a CIDR (like {DEFAULT_POOL})"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("`{address}` is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("`/{prefix}` is not a prefix length (0 to 32)"))?;
        let base = u32::from(address);
        let cidr = Cidr { base, prefix };
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        if base & !mask != 0 {
            return Err(format!(
                "`{text}` has host bits set (the network is {}/{prefix})",
                Ipv4Addr::from(base & mask)
            ));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

/// The pool job networks take their /24s from: an IPv4 CIDR from /8 to /24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pool(Cidr);

impl FromStr for Pool {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let cidr: Cidr = text.parse()?;
        if !(8..=JOB_PREFIX).contains(&cidr.prefix) {
            return Err(format!(
                "the prefix must be from /8 to /{JOB_PREFIX} (each job takes a /{JOB_PREFIX}), not /{}",
                cidr.prefix
            ));
        }
        Ok(Pool(cidr))
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Pool {
    /// How many job networks the pool holds.
    pub fn subnets(self) -> u32 {
        1 << (JOB_PREFIX - self.0.prefix)
    }

    fn subnet(self, index: u32) -> Cidr {
        Cidr {
            base: self.0.base + (index << (32 - u32::from(JOB_PREFIX))),
            prefix: JOB_PREFIX,
        }
    }

    /// The indices of the pool's /24s that `other` overlaps, as an inclusive range.
    fn overlapped_by(self, other: Cidr) -> Option<(u32, u32)> {
        let first = other.first().max(self.0.first());
        let last = other.last().min(self.0.last());
        let shift = 32 - u32::from(JOB_PREFIX);
        (first <= last).then(|| {
            (
                (first - self.0.base) >> shift,
                (last - self.0.base) >> shift,
            )
        })
    }

    /// A /24 of the pool that none of `taken` overlaps, searched from `start` on (wrapping),
    /// so that concurrent jobs starting at random places rarely pick the same one.
    pub fn free_subnet(self, taken: &[Cidr], start: u32) -> Option<Cidr> {
        let used: Vec<(u32, u32)> = taken
            .iter()
            .filter_map(|c| self.overlapped_by(*c))
            .collect();
        let count = self.subnets();
        (0..count)
            .map(|k| (start % count + k) % count)
            .find(|i| !used.iter().any(|(lo, hi)| (lo..=hi).contains(&i)))
            .map(|i| self.subnet(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    #[test]
    fn pools_are_ipv4_cidrs_from_8_to_24_without_host_bits() {
        let pool: Pool = "10.213.0.0/16".parse().unwrap();
        assert_eq!(pool.subnets(), 256);
        assert_eq!(pool.to_string(), "10.213.0.0/16");
        assert_eq!("10.0.0.0/8".parse::<Pool>().unwrap().subnets(), 65536);
        assert_eq!("192.168.7.0/24".parse::<Pool>().unwrap().subnets(), 1);
        for bad in [
            "10.213.0.0",
            "10.213.0.0/25",
            "10.0.0.0/7",
            "10.213.1.0/16",
            "fd00::/64",
            "10.213.0.0/x",
            "10.213.0.0/33",
            "",
        ] {
            assert!(bad.parse::<Pool>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_free_subnet_skips_every_one_an_existing_network_overlaps() {
        let pool: Pool = "10.213.0.0/22".parse().unwrap();
        let taken = [
            cidr("172.17.0.0/16"),
            cidr("10.213.0.0/24"),
            cidr("10.213.1.128/25"),
        ];
        assert_eq!(
            pool.free_subnet(&taken, 0),
            Some(cidr("10.213.2.0/24")),
            "the first free one from the start"
        );
        assert_eq!(pool.free_subnet(&taken, 3), Some(cidr("10.213.3.0/24")));
        // Wraps around from the last.
        let all_but_first = [cidr("10.213.1.0/24"), cidr("10.213.2.0/23")];
        assert_eq!(
            pool.free_subnet(&all_but_first, 2),
            Some(cidr("10.213.0.0/24"))
        );
        // A network larger than the pool takes all of it.
        assert_eq!(pool.free_subnet(&[cidr("10.0.0.0/8")], 1), None);
    }
}
