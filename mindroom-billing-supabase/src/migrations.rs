//! The SQL migrations, embedded. The files under `migrations/` follow the Supabase CLI layout
//! (`<timestamp>_<name>.sql`), so `supabase db push` can apply them too; [`crate::PgStore::migrate`]
//! applies them from the binary. Every file is idempotent.

/// One migration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// The timestamp prefix of the file name (`20261125000000`).
    pub version: &'static str,
    /// The rest of the file name, without `.sql` (`billing_schema`).
    pub name: &'static str,
    /// The SQL.
    pub sql: &'static str,
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: "20261125000000",
        name: "billing_schema",
        sql: include_str!("../migrations/20261125000000_billing_schema.sql"),
    },
    Migration {
        version: "20261125000100",
        name: "billing_functions",
        sql: include_str!("../migrations/20261125000100_billing_functions.sql"),
    },
    Migration {
        version: "20261125000200",
        name: "billing_record_and_load",
        sql: include_str!("../migrations/20261125000200_billing_record_and_load.sql"),
    },
    Migration {
        version: "20261126000000",
        name: "billing_adopt_instances",
        sql: include_str!("../migrations/20261126000000_billing_adopt_instances.sql"),
    },
    Migration {
        version: "20261126000100",
        name: "billing_entitlement_status",
        sql: include_str!("../migrations/20261126000100_billing_entitlement_status.sql"),
    },
    Migration {
        version: "20261201000200",
        name: "billing_edges",
        sql: include_str!("../migrations/20261201000200_billing_edges.sql"),
    },
    Migration {
        version: "20261202000000",
        name: "billing_usage_idempotency",
        sql: include_str!("../migrations/20261202000000_billing_usage_idempotency.sql"),
    },
    Migration {
        version: "20261203000000",
        name: "billing_stripe_sync",
        sql: include_str!("../migrations/20261203000000_billing_stripe_sync.sql"),
    },
    Migration {
        version: "20261204000000",
        name: "billing_account_changes",
        sql: include_str!("../migrations/20261204000000_billing_account_changes.sql"),
    },
    Migration {
        version: "20261204000100",
        name: "billing_record_and_commit",
        sql: include_str!("../migrations/20261204000100_billing_record_and_commit.sql"),
    },
    Migration {
        version: "20261205000000",
        name: "billing_retention",
        sql: include_str!("../migrations/20261205000000_billing_retention.sql"),
    },
    Migration {
        version: "20261206000000",
        name: "billing_console",
        sql: include_str!("../migrations/20261206000000_billing_console.sql"),
    },
    Migration {
        version: "20261208000000",
        name: "billing_instance_intent",
        sql: include_str!("../migrations/20261208000000_billing_instance_intent.sql"),
    },
    Migration {
        version: "20261209000000",
        name: "billing_email_key_retention",
        sql: include_str!("../migrations/20261209000000_billing_email_key_retention.sql"),
    },
    Migration {
        version: "20261209000100",
        name: "billing_usage_key_scope",
        sql: include_str!("../migrations/20261209000100_billing_usage_key_scope.sql"),
    },
    Migration {
        version: "20261210000000",
        name: "billing_account_reference",
        sql: include_str!("../migrations/20261210000000_billing_account_reference.sql"),
    },
    Migration {
        version: "20261211000000",
        name: "billing_list_subscriptions",
        sql: include_str!("../migrations/20261211000000_billing_list_subscriptions.sql"),
    },
    Migration {
        version: "20261212000000",
        name: "billing_console_operators",
        sql: include_str!("../migrations/20261212000000_billing_console_operators.sql"),
    },
    Migration {
        version: "20261213000000",
        name: "billing_disputes",
        sql: include_str!("../migrations/20261213000000_billing_disputes.sql"),
    },
];

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;

    #[test]
    fn embedded_list_matches_the_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<String> = MIGRATIONS.iter().map(|m| format!("{}_{}.sql", m.version, m.name)).collect();
        assert_eq!(files, embedded);
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
    }

    /// pg-safeupdate (active for Supabase API traffic) rejects UPDATE/DELETE without WHERE.
    #[test]
    fn every_update_and_delete_has_a_where_clause() {
        for m in MIGRATIONS {
            let lower = m.sql.to_ascii_lowercase();
            for statement in lower.split(';') {
                let code: String =
                    statement.lines().map(|l| l.split("--").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
                let words: Vec<&str> = code.split_whitespace().collect();
                for (i, w) in words.iter().enumerate() {
                    let is_dml = (*w == "update" && words.get(i + 1).is_some_and(|n| n.starts_with("public.")))
                        || (*w == "delete" && words.get(i + 1) == Some(&"from"));
                    if is_dml {
                        assert!(words[i..].contains(&"where"), "{}: statement without WHERE: {code}", m.name);
                    }
                }
            }
        }
    }

    /// PostgREST cannot call overloaded functions: a name always has the same parameters (a later
    /// migration may replace a function, never overload it).
    #[test]
    fn function_names_are_never_overloaded() {
        let mut signatures = std::collections::BTreeMap::new();
        for m in MIGRATIONS {
            let lower = m.sql.to_ascii_lowercase();
            for part in lower.split("create or replace function ").skip(1) {
                let (name, rest) = part.split_once('(').unwrap_or((part, ""));
                let params = rest.split(')').next().unwrap_or("").trim().to_owned();
                let seen = signatures.entry(name.trim().to_owned()).or_insert_with(|| params.clone());
                assert_eq!(*seen, params, "{} is overloaded in {}", name.trim(), m.name);
            }
        }
        assert!(signatures.len() > 15);
    }
}
