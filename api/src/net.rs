//! Address ranges (CIDR) of the webhook settings: parsed once, tested per address.

use std::net::IpAddr;

/// An address range in CIDR notation (`10.0.0.0/8`, `fe80::/10`; a bare address is a
/// range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses a comma-separated list of ranges (`TESTFLINGER_WEBHOOK_BLOCKED_NETS`). The
/// error names the entry and the accepted shape.
pub fn parse_nets(list: &str) -> Result<Vec<Net>, String> {
    let mut out = Vec::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || {
            format!(
                "'{raw}' is not an address range; expected ADDRESS/PREFIX such as 10.0.0.0/8 or fe80::/10"
            )
        };
        let (a, p) = raw.split_once('/').unwrap_or((raw, ""));
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>().ok().filter(|n| *n <= max).ok_or_else(bad)?
        };
        out.push(Net { addr, prefix });
    }
    Ok(out)
}
