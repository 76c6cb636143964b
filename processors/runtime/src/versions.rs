//! The server versions weir needs, checked by `weir doctor` (and so by every release's setup
//! task, terraform/release.tf): PostgreSQL 15 or later (weir is tested on 15 and RDS 16) and
//! pgvector 0.8.0 or later (the semantic cache's filtered HNSW search relies on 0.8's
//! iterative index scans, `hnsw.iterative_scan`). On RDS the pgvector version follows the
//! engine's minor version, which terraform pins (db_engine_version, 16.6 or later).
//!
//! Invariant: a version string that does not parse is refused, never assumed good.

/// Oldest PostgreSQL weir supports, as `server_version_num` (major * 10000 + minor).
pub const MIN_POSTGRES_VERSION_NUM: u32 = 150_000;

/// Oldest pgvector weir supports (major, minor, patch).
pub const MIN_PGVECTOR: (u32, u32, u32) = (0, 8, 0);

/// Checks PostgreSQL's `server_version_num` (e.g. `160008`); the error says what is needed.
pub fn check_postgres(server_version_num: &str) -> Result<(), String> {
    let n: u32 = server_version_num
        .trim()
        .parse()
        .map_err(|_| format!("unreadable server_version_num {server_version_num:?}"))?;
    if n >= MIN_POSTGRES_VERSION_NUM {
        Ok(())
    } else {
        Err(format!(
            "PostgreSQL {}.{} is too old: weir needs {} or later",
            n / 10_000,
            n % 10_000,
            MIN_POSTGRES_VERSION_NUM / 10_000
        ))
    }
}

/// Checks pgvector's `extversion` (e.g. `0.8.0`); the error says what is needed.
pub fn check_pgvector(extversion: &str) -> Result<(), String> {
    let parts: Vec<u32> = extversion
        .trim()
        .split('.')
        .map(|p| p.parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("unreadable pgvector version {extversion:?}"))?;
    let v = match parts.as_slice() {
        [a, b] => (*a, *b, 0),
        [a, b, c] => (*a, *b, *c),
        _ => return Err(format!("unreadable pgvector version {extversion:?}")),
    };
    if v >= MIN_PGVECTOR {
        Ok(())
    } else {
        let (a, b, c) = MIN_PGVECTOR;
        Err(format!(
            "pgvector {extversion} is too old: weir needs {a}.{b}.{c} or later \
             (ALTER EXTENSION vector UPDATE; on RDS a newer engine minor)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_versions() {
        assert!(check_postgres("150020").is_ok());
        assert!(check_postgres("160008").is_ok());
        assert!(check_postgres("170002").is_ok());
        let e = check_postgres("140011").unwrap_err();
        assert!(e.contains("14.11") && e.contains("15"), "{e}");
        assert!(
            check_postgres("16.8").is_err(),
            "the display form is not the number"
        );
        assert!(check_postgres("").is_err());
    }

    #[test]
    fn pgvector_versions() {
        assert!(check_pgvector("0.8.0").is_ok());
        assert!(check_pgvector("0.8.1").is_ok());
        assert!(
            check_pgvector("0.10.0").is_ok(),
            "compared as numbers, not text"
        );
        assert!(check_pgvector("1.0").is_ok());
        let e = check_pgvector("0.7.4").unwrap_err();
        assert!(e.contains("0.8.0"), "{e}");
        assert!(check_pgvector("0.8.0-dev").is_err());
        assert!(check_pgvector("abc").is_err());
        assert!(check_pgvector("0").is_err());
    }
}
