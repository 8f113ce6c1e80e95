//! A VIP's zone policy: the balancer's own `zone` and the VIP's
//! `zone_min_healthy`, as the routing in `balance::zone` applies them.

/// Parts per million in a whole.
const PPM: u64 = 1_000_000;

/// The zone policy of one VIP, from the balancer's `zone` and the VIP's
/// `zone_min_healthy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZonePolicy {
    /// The balancer's own zone.
    pub zone: String,
    /// Fraction of local backends that must be healthy to route locally, in
    /// parts per million (integers keep `0.7 × 10` at exactly 7).
    pub min_healthy_ppm: u32,
}

impl ZonePolicy {
    /// A policy for `zone` with the fraction `min_healthy` (0..=1).
    pub fn new(zone: &str, min_healthy: f64) -> ZonePolicy {
        ZonePolicy {
            zone: zone.to_owned(),
            min_healthy_ppm: (min_healthy.clamp(0.0, 1.0) * PPM as f64).round() as u32,
        }
    }

    /// The fraction, as configured.
    pub fn min_healthy(&self) -> f64 {
        f64::from(self.min_healthy_ppm) / PPM as f64
    }

    /// Healthy local backends needed to route locally, out of `listed`.
    pub fn needed(&self, listed: usize) -> usize {
        let listed = listed as u64;
        let needed = (listed * u64::from(self.min_healthy_ppm)).div_ceil(PPM);
        usize::try_from(needed.max(1)).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_number_needed_is_a_ceiling_with_a_floor_of_one() {
        let p = ZonePolicy::new("a", 0.7);
        assert_eq!(p.needed(10), 7, "0.7 × 10 is exactly 7, not 8");
        assert_eq!(p.needed(3), 3);
        assert_eq!(p.needed(1), 1);
        assert_eq!(ZonePolicy::new("a", 0.5).needed(3), 2);
        assert_eq!(
            ZonePolicy::new("a", 0.0).needed(5),
            1,
            "one healthy local backend at least"
        );
        assert_eq!(ZonePolicy::new("a", 1.0).needed(4), 4);
    }
}
