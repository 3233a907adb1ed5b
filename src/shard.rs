//! Scale-out: `--shard INDEX/COUNT` gives each mailbox to exactly one of COUNT replicas,
//! by a stable hash of its name, so a StatefulSet of COUNT replicas sharing one config
//! covers the fleet once. The hash is FNV-1a (`scheduler::stable_hash`): the same in every
//! build, so an upgrade does not move mailboxes between replicas.

use crate::config::Config;
use crate::scheduler::stable_hash;
use std::fmt;
use std::str::FromStr;

/// This replica's share of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// Whether `mailbox` is probed by this replica. All protocols of a mailbox go to the
    /// same replica, so its rows stay together on one status page.
    pub fn owns(&self, mailbox: &str) -> bool {
        stable_hash(mailbox.as_bytes()) % u64::from(self.count) == u64::from(self.index)
    }

    /// `config` with only this shard's mailboxes, and only the credentials they use (so
    /// a credential's expiry series comes from one replica, not COUNT of them).
    pub fn filter(&self, mut config: Config) -> Config {
        config.mailboxes.retain(|name, _| self.owns(name));
        let used: Vec<String> = config
            .mailboxes
            .values()
            .map(|m| m.credential.clone())
            .collect();
        config.credentials.retain(|name, _| used.contains(name));
        config
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;

    /// `INDEX/COUNT`, where INDEX may also be a StatefulSet pod name ending in `-INDEX`
    /// (`--shard $(POD_NAME)/3`), so manifests need no script to extract the ordinal.
    fn from_str(s: &str) -> Result<Shard, String> {
        let usage = || format!("`{s}` is not INDEX/COUNT (like 0/3 or mail-oauth-exporter-2/3)");
        let (index, count) = s.rsplit_once('/').ok_or_else(usage)?;
        let ordinal = match index.rsplit_once('-') {
            Some((pod, n)) if !pod.is_empty() => n,
            Some(_) => return Err(usage()),
            None => index,
        };
        let index: u32 = ordinal.parse().map_err(|_| usage())?;
        let count: u32 = count.parse().map_err(|_| usage())?;
        if count == 0 || index >= count {
            return Err(format!(
                "shard `{s}`: INDEX must be below COUNT (0 to {})",
                count.saturating_sub(1)
            ));
        }
        Ok(Shard { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers_and_pod_names() {
        assert_eq!("1/3".parse(), Ok(Shard { index: 1, count: 3 }));
        assert_eq!(
            "mail-oauth-exporter-2/3".parse(),
            Ok(Shard { index: 2, count: 3 })
        );
        for bad in ["3/3", "1", "a/3", "1/0", "-1/3", "1/x", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_mailbox_has_exactly_one_shard_and_shards_are_balanced() {
        let count = 4;
        let shards: Vec<Shard> = (0..count).map(|index| Shard { index, count }).collect();
        let mut sizes = vec![0; count as usize];
        for i in 0..4000 {
            let name = format!("mailbox-{i}@contoso.com");
            let owners: Vec<u32> = shards
                .iter()
                .filter(|s| s.owns(&name))
                .map(|s| s.index)
                .collect();
            assert_eq!(owners.len(), 1, "{name}: {owners:?}");
            sizes[owners[0] as usize] += 1;
        }
        for s in sizes {
            assert!((850..=1150).contains(&s), "unbalanced: {s} of 4000");
        }
    }

    #[test]
    fn assignment_is_stable_across_builds() {
        // Pinned (computed independently): changing the hash would move mailboxes
        // between running replicas, and each would lose its rhythm and token cache.
        let of3 = |n: &str| (0..3).find(|&index| Shard { index, count: 3 }.owns(n));
        assert_eq!(
            ["helpdesk", "former-employee", "slow-server"].map(of3),
            [Some(2), Some(1), Some(0)]
        );
    }
}
