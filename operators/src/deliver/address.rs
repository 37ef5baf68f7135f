//! The address policy: which IP addresses a delivery may connect to.
//!
//! An endpoint URL names a host chosen by a customer, so without a policy a webhook could be
//! aimed at the delivery machine itself, its private network or a cloud metadata service.
//! [`AddressPolicy::check`] rejects every address that is not globally reachable unless an
//! operator allowed its range explicitly. IPv6 forms that embed an IPv4 address (mapped,
//! NAT64, 6to4) are judged by the embedded address, so a rejected IPv4 address cannot be
//! reached through another notation. The checks are pure: they look at the address only.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The class of a rejected address, named in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusedRange {
    /// `0.0.0.0/8` and `::`.
    Unspecified,
    /// `127.0.0.0/8` and `::1`.
    Loopback,
    /// RFC 1918 (`10/8`, `172.16/12`, `192.168/16`), IPv6 unique local `fc00::/7` and the
    /// deprecated site-local `fec0::/10`.
    Private,
    /// The carrier-grade NAT range `100.64.0.0/10` (RFC 6598).
    SharedAddressSpace,
    /// `169.254.0.0/16` (which contains the cloud metadata service `169.254.169.254`) and
    /// `fe80::/10`.
    LinkLocal,
    /// `255.255.255.255`.
    Broadcast,
    /// The documentation ranges `192.0.2/24`, `198.51.100/24`, `203.0.113/24`,
    /// `2001:db8::/32` and `3fff::/20`.
    Documentation,
    /// `224.0.0.0/4` and `ff00::/8`.
    Multicast,
    /// Every other special-purpose or unallocated range: `192.0.0/24`, `192.88.99/24`,
    /// `198.18/15`, `240/4`, IPv4-compatible `::/96`, `64:ff9b:1::/48`, `100::/64`,
    /// `2001::/23`, `5f00::/16`, and IPv6 outside `2000::/3`.
    Reserved,
}

impl RefusedRange {
    /// Returns a short name for the range, as used in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusedRange::Unspecified => "unspecified",
            RefusedRange::Loopback => "loopback",
            RefusedRange::Private => "private",
            RefusedRange::SharedAddressSpace => "shared address space (carrier-grade NAT)",
            RefusedRange::LinkLocal => "link-local",
            RefusedRange::Broadcast => "broadcast",
            RefusedRange::Documentation => "documentation",
            RefusedRange::Multicast => "multicast",
            RefusedRange::Reserved => "reserved",
        }
    }
}

impl fmt::Display for RefusedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decides whether an IP address may be contacted.
///
/// # Contract
///
/// An address is permitted when [`refused_range`] finds it globally reachable, or when one
/// of `allowed` contains it. An IPv4-mapped IPv6 address is also permitted when an allowed
/// range contains its IPv4 form, so allowing `127.0.0.1/32` allows `::ffff:127.0.0.1` too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Ranges that are permitted even though they are not globally reachable, such as
    /// `10.20.0.0/16` for endpoints inside a trusted network. Empty by default.
    pub allowed: Vec<IpNet>,
}

impl AddressPolicy {
    /// Creates a policy that permits globally reachable addresses and `allowed`.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        AddressPolicy { allowed }
    }

    /// Checks whether `address` may be contacted.
    ///
    /// # Errors
    ///
    /// Returns the range that rejects the address when it is not globally reachable and no
    /// allowed range contains it.
    pub fn check(&self, address: IpAddr) -> Result<(), RefusedRange> {
        let Some(range) = refused_range(address) else {
            return Ok(());
        };
        let canonical = address.to_canonical();
        let allowed = self
            .allowed
            .iter()
            .any(|net| net.contains(&address) || net.contains(&canonical));
        if allowed {
            Ok(())
        } else {
            Err(range)
        }
    }
}

/// Classifies an address: `None` when it is globally reachable, otherwise the range that
/// makes it unfit for webhook delivery.
pub fn refused_range(address: IpAddr) -> Option<RefusedRange> {
    match address {
        IpAddr::V4(v4) => refused_range_v4(v4),
        IpAddr::V6(v6) => refused_range_v6(v6),
    }
}

fn refused_range_v4(address: Ipv4Addr) -> Option<RefusedRange> {
    let [a, b, c, _] = address.octets();
    let range = match (a, b, c) {
        (0, _, _) => RefusedRange::Unspecified,
        (10, _, _) => RefusedRange::Private,
        (100, 64..=127, _) => RefusedRange::SharedAddressSpace,
        (127, _, _) => RefusedRange::Loopback,
        (169, 254, _) => RefusedRange::LinkLocal,
        (172, 16..=31, _) => RefusedRange::Private,
        (192, 0, 0) => RefusedRange::Reserved,
        (192, 0, 2) => RefusedRange::Documentation,
        (192, 88, 99) => RefusedRange::Reserved,
        (192, 168, _) => RefusedRange::Private,
        (198, 18..=19, _) => RefusedRange::Reserved,
        (198, 51, 100) => RefusedRange::Documentation,
        (203, 0, 113) => RefusedRange::Documentation,
        (224..=239, _, _) => RefusedRange::Multicast,
        _ if address.is_broadcast() => RefusedRange::Broadcast,
        (240..=255, _, _) => RefusedRange::Reserved,
        _ => return None,
    };
    Some(range)
}

fn refused_range_v6(address: Ipv6Addr) -> Option<RefusedRange> {
    if address.is_unspecified() {
        return Some(RefusedRange::Unspecified);
    }
    if address.is_loopback() {
        return Some(RefusedRange::Loopback);
    }
    if let Some(embedded) = embedded_ipv4(address) {
        return refused_range_v4(embedded);
    }

    let segments = address.segments();
    let range = match segments {
        // IPv4-compatible addresses (`::a.b.c.d`) are deprecated and never routed.
        [0, 0, 0, 0, 0, 0, _, _] => RefusedRange::Reserved,
        [0x64, 0xff9b, 1, ..] => RefusedRange::Reserved,
        [0x100, 0, 0, 0, ..] => RefusedRange::Reserved,
        [0x2001, 0x0db8, ..] => RefusedRange::Documentation,
        [0x2001, 0x0000..=0x01ff, ..] => RefusedRange::Reserved,
        [0x3fff, 0x0000..=0x0fff, ..] => RefusedRange::Documentation,
        [0x5f00, ..] => RefusedRange::Reserved,
        [0xfc00..=0xfdff, ..] => RefusedRange::Private,
        [0xfe80..=0xfebf, ..] => RefusedRange::LinkLocal,
        [0xfec0..=0xfeff, ..] => RefusedRange::Private,
        [0xff00..=0xffff, ..] => RefusedRange::Multicast,
        [0x2000..=0x3fff, ..] => return None,
        _ => RefusedRange::Reserved,
    };
    Some(range)
}

/// Returns the IPv4 address inside an IPv4-mapped (`::ffff:0:0/96`), NAT64 well-known prefix
/// (`64:ff9b::/96`) or 6to4 (`2002::/16`) address.
fn embedded_ipv4(address: Ipv6Addr) -> Option<Ipv4Addr> {
    let segments = address.segments();
    let from_segments = |high: u16, low: u16| {
        let [a, b] = high.to_be_bytes();
        let [c, d] = low.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    match segments {
        [0, 0, 0, 0, 0, 0xffff, high, low] => Some(from_segments(high, low)),
        [0x64, 0xff9b, 0, 0, 0, 0, high, low] => Some(from_segments(high, low)),
        [0x2002, high, low, ..] => Some(from_segments(high, low)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse()
            .unwrap_or_else(|e| panic!("`{text}` is not an IP address: {e}"))
    }

    #[test]
    fn refused_range_table() {
        use RefusedRange::*;
        let cases: &[(&str, Option<RefusedRange>)] = &[
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("10.0.0.1", Some(Private)),
            ("10.255.255.255", Some(Private)),
            ("100.63.255.255", None),
            ("100.64.0.1", Some(SharedAddressSpace)),
            ("100.100.100.200", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("100.128.0.0", None),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("169.254.169.254", Some(LinkLocal)),
            ("169.254.0.1", Some(LinkLocal)),
            ("172.15.255.255", None),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.0", None),
            ("192.0.0.8", Some(Reserved)),
            ("192.0.2.10", Some(Documentation)),
            ("192.88.99.1", Some(Reserved)),
            ("192.168.1.1", Some(Private)),
            ("192.169.0.1", None),
            ("198.18.0.1", Some(Reserved)),
            ("198.19.255.255", Some(Reserved)),
            ("198.20.0.0", None),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.9", Some(Documentation)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("240.0.0.1", Some(Reserved)),
            ("255.255.255.254", Some(Reserved)),
            ("255.255.255.255", Some(Broadcast)),
            ("1.1.1.1", None),
            ("8.8.8.8", None),
            ("93.184.215.14", None),
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:7f00:1", Some(Loopback)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:0.0.0.0", Some(Unspecified)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(Reserved)),
            ("::8.8.8.8", Some(Reserved)),
            ("64:ff9b::127.0.0.1", Some(Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
            ("64:ff9b::8.8.8.8", None),
            ("64:ff9b:1::1", Some(Reserved)),
            ("100::1", Some(Reserved)),
            ("2001::1", Some(Reserved)),
            ("2001:1ff::1", Some(Reserved)),
            ("2001:200::1", None),
            ("2001:db8::1", Some(Documentation)),
            ("2002:7f00:1::1", Some(Loopback)),
            ("2002:c0a8:101::1", Some(Private)),
            ("2002:808:808::1", None),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001::200e", None),
            ("3fff::1", Some(Documentation)),
            ("5f00::1", Some(Reserved)),
            ("fc00::1", Some(Private)),
            ("fd00:ec2::254", Some(Private)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("fec0::1", Some(Private)),
            ("ff02::1", Some(Multicast)),
            ("4000::1", Some(Reserved)),
            ("1::1", Some(Reserved)),
        ];
        for (text, expected) in cases {
            assert_eq!(refused_range(ip(text)), *expected, "{text}");
        }
    }

    #[test]
    fn policy_rejects_without_allow_list() {
        let policy = AddressPolicy::default();
        assert_eq!(policy.check(ip("127.0.0.1")), Err(RefusedRange::Loopback));
        assert_eq!(
            policy.check(ip("169.254.169.254")),
            Err(RefusedRange::LinkLocal)
        );
        assert_eq!(policy.check(ip("8.8.8.8")), Ok(()));
    }

    #[test]
    fn policy_permits_allowed_ranges() {
        let allowed = ["127.0.0.1/32", "10.20.0.0/16", "fd00::/8"]
            .iter()
            .map(|net| {
                net.parse()
                    .unwrap_or_else(|e| panic!("`{net}` is not a CIDR: {e}"))
            })
            .collect();
        let policy = AddressPolicy::new(allowed);
        let cases = [
            ("127.0.0.1", Ok(())),
            ("::ffff:127.0.0.1", Ok(())),
            ("127.0.0.2", Err(RefusedRange::Loopback)),
            ("::1", Err(RefusedRange::Loopback)),
            ("10.20.3.4", Ok(())),
            ("10.21.0.1", Err(RefusedRange::Private)),
            ("fd12::1", Ok(())),
            ("fc00::1", Err(RefusedRange::Private)),
            ("169.254.169.254", Err(RefusedRange::LinkLocal)),
        ];
        for (text, expected) in cases {
            assert_eq!(policy.check(ip(text)), expected, "{text}");
        }
    }
}
