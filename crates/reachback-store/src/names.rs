//! The connector's DNS table as the store sees it: bound hostnames with their
//! virtual IPs (a snapshot read in keyset pages), and the addresses whose binding
//! changed since a time (the feed every replica pushes to its connectors).

use sqlx::Row;

use crate::{Result, Store};

/// A change of one address: bound to a hostname, or released (`None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameChange {
    pub ip: String,
    pub hostname: Option<String>,
    pub last_updated: i64,
}

impl Store {
    /// Bound (hostname, address) pairs in address-key order after `after` (a key this
    /// returned last, or `None` to start), at most `limit`; with each page's last key.
    pub async fn bound_names(&self, after: Option<&[u8]>, limit: i64) -> Result<(Vec<(String, String)>, Option<Vec<u8>>)> {
        let rows = match after {
            Some(key) => {
                sqlx::query("SELECT ip_key, ip, client_hostname FROM bindings WHERE ip_key > $1 AND device_id IS NOT NULL ORDER BY ip_key LIMIT $2")
                    .bind(key.to_vec())
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT ip_key, ip, client_hostname FROM bindings WHERE device_id IS NOT NULL ORDER BY ip_key LIMIT $1")
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut names = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in &rows {
            last = Some(row.try_get::<Vec<u8>, _>(0)?);
            let hostname: Option<String> = row.try_get(2)?;
            if let Some(hostname) = hostname {
                names.push((hostname, row.try_get(1)?));
            }
        }
        Ok((names, last))
    }

    /// Addresses whose binding changed at or after `since` (microseconds), oldest
    /// first, at most `limit`: bound ones with their hostname, released ones without.
    pub async fn name_changes_since(&self, since: i64, limit: i64) -> Result<Vec<NameChange>> {
        let rows = sqlx::query("SELECT ip, client_hostname, last_updated FROM bindings WHERE last_updated >= $1 ORDER BY last_updated LIMIT $2")
            .bind(since)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| Ok(NameChange { ip: row.try_get(0)?, hostname: row.try_get(1)?, last_updated: row.try_get(2)? })).collect()
    }
}
