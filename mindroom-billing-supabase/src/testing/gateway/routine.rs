//! Function lookup in `pg_proc` and PostgREST's overload resolution (POSTGREST.md §1).

use std::collections::BTreeSet;

use sqlx::{PgConnection, Row};

use super::error::ErrorResponse;

/// One input parameter of a routine.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    pub(crate) name: String,
    /// `format_type()` of the parameter type.
    pub(crate) ty: String,
    pub(crate) has_default: bool,
    pub(crate) variadic: bool,
}

/// How the result is shaped (§2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReturnKind {
    Void,
    Scalar,
    SetScalar,
    Composite,
    SetComposite,
}

/// A callable function.
#[derive(Debug, Clone)]
pub(crate) struct Routine {
    pub(crate) schema: String,
    pub(crate) name: String,
    pub(crate) params: Vec<Param>,
    pub(crate) volatile: bool,
    pub(crate) ret: ReturnKind,
    /// `proconfig` entries (`name=value`).
    pub(crate) config: Vec<String>,
}

impl Routine {
    pub(crate) fn single_unnamed_type(&self) -> Option<&str> {
        match self.params.as_slice() {
            [p] if p.name.is_empty() => Some(p.ty.as_str()),
            _ => None,
        }
    }

    /// Value of a `SET` clause of the function (e.g. `statement_timeout`).
    pub(crate) fn setting(&self, name: &str) -> Option<&str> {
        self.config.iter().find_map(|c| c.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
    }
}

struct ProcRow {
    volatility: String,
    retset: bool,
    nargs: i32,
    ndefaults: i32,
    ret_typname: String,
    ret_typtype: String,
    ret_is_pg_catalog: bool,
    config: Vec<String>,
    arg_types: Vec<String>,
    arg_names: Vec<String>,
    arg_modes: Vec<String>,
}

const PROC_SQL: &str = "\
select p.provolatile::text as volatility,
       p.proretset as retset,
       p.pronargs::int4 as nargs,
       p.pronargdefaults::int4 as ndefaults,
       rt.typname::text as ret_typname,
       rt.typtype::text as ret_typtype,
       rt.typnamespace = 'pg_catalog'::regnamespace as ret_is_pg_catalog,
       coalesce(p.proconfig, '{}')::text[] as config,
       array(select format_type(u.t, null)
               from unnest(coalesce(p.proallargtypes, p.proargtypes::oid[])) with ordinality as u(t, i)
              order by u.i)::text[] as arg_types,
       coalesce(p.proargnames, '{}')::text[] as arg_names,
       coalesce(p.proargmodes::text[], '{}')::text[] as arg_modes
  from pg_catalog.pg_proc p
  join pg_catalog.pg_namespace n on n.oid = p.pronamespace
  join pg_catalog.pg_type rt on rt.oid = p.prorettype
 where n.nspname = $1 and p.proname = $2 and p.prokind = 'f'
 order by p.oid";

const UNNAMED_TYPES: [&str; 5] = ["json", "jsonb", "text", "xml", "bytea"];

fn to_routine(schema: &str, name: &str, row: ProcRow) -> Option<Routine> {
    if row.ret_is_pg_catalog && row.ret_typname == "trigger" {
        return None;
    }
    let mut params = Vec::new();
    let mut has_out = false;
    for (i, ty) in row.arg_types.iter().enumerate() {
        let mode = row.arg_modes.get(i).map_or("i", String::as_str);
        let pname = row.arg_names.get(i).cloned().unwrap_or_default();
        match mode {
            "i" | "v" => params.push((pname, ty.clone(), mode == "v")),
            "b" => {
                has_out = true;
                params.push((pname, ty.clone(), false));
            }
            _ => has_out = true,
        }
    }
    let nargs = usize::try_from(row.nargs).ok()?;
    let ndefaults = usize::try_from(row.ndefaults).ok()?;
    debug_assert_eq!(nargs, params.len());
    let first_default = nargs.saturating_sub(ndefaults);
    let params: Vec<Param> = params
        .into_iter()
        .enumerate()
        .map(|(i, (name, ty, variadic))| Param { name, ty, has_default: i >= first_default, variadic })
        .collect();
    let all_named = params.iter().all(|p| !p.name.is_empty());
    let single_unnamed = matches!(params.as_slice(),
        [p] if p.name.is_empty() && UNNAMED_TYPES.contains(&p.ty.as_str()));
    if !all_named && !single_unnamed {
        return None;
    }
    let composite = has_out || row.ret_typtype == "c";
    let void = row.ret_is_pg_catalog && row.ret_typname == "void";
    let ret = match (void, composite, row.retset) {
        (true, _, false) => ReturnKind::Void,
        (_, true, false) => ReturnKind::Composite,
        (_, true, true) => ReturnKind::SetComposite,
        (_, false, true) => ReturnKind::SetScalar,
        (_, false, false) => ReturnKind::Scalar,
    };
    Some(Routine {
        schema: schema.to_owned(),
        name: name.to_owned(),
        params,
        volatile: row.volatility == "v",
        ret,
        config: row.config,
    })
}

/// Loads the callable overloads of `schema.name`.
pub(crate) async fn load(conn: &mut PgConnection, schema: &str, name: &str) -> Result<Vec<Routine>, sqlx::Error> {
    let rows = sqlx::query(PROC_SQL).bind(schema).bind(name).fetch_all(conn).await?;
    let mut out = Vec::new();
    for r in rows {
        let row = ProcRow {
            volatility: r.try_get("volatility")?,
            retset: r.try_get("retset")?,
            nargs: r.try_get("nargs")?,
            ndefaults: r.try_get("ndefaults")?,
            ret_typname: r.try_get("ret_typname")?,
            ret_typtype: r.try_get("ret_typtype")?,
            ret_is_pg_catalog: r.try_get("ret_is_pg_catalog")?,
            config: r.try_get("config")?,
            arg_types: r.try_get("arg_types")?,
            arg_names: r.try_get("arg_names")?,
            arg_modes: r.try_get("arg_modes")?,
        };
        out.extend(to_routine(schema, name, row));
    }
    Ok(out)
}

/// What the body was sent as (for the single-unnamed-parameter fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    Json,
    Form,
    Text,
    Xml,
    Octet,
    /// GET/HEAD: arguments from the query string.
    Query,
}

fn ident_list(keys: &BTreeSet<String>) -> String {
    keys.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// PostgREST's `findProc`: exact key-set match with defaults, then the single unnamed
/// parameter fallback.
pub(crate) fn find_proc(
    schema: &str,
    name: &str,
    routines: Vec<Routine>,
    keys: &BTreeSet<String>,
    body_kind: BodyKind,
) -> Result<Routine, ErrorResponse> {
    let is_post = body_kind != BodyKind::Query;
    let fallback_types: &[&str] = match body_kind {
        BodyKind::Json => &["json", "jsonb"],
        BodyKind::Text => &["text"],
        BodyKind::Xml => &["xml"],
        BodyKind::Octet => &["bytea"],
        BodyKind::Form | BodyKind::Query => &[],
    };
    let mut exact = Vec::new();
    let mut fallback = Vec::new();
    for r in routines {
        let matches = if r.params.is_empty() {
            keys.is_empty()
        } else {
            let names: BTreeSet<&str> = r.params.iter().map(|p| p.name.as_str()).collect();
            let required_ok = r.params.iter().filter(|p| !p.has_default).all(|p| keys.contains(&p.name));
            required_ok && keys.iter().all(|k| names.contains(k.as_str()))
        };
        if matches {
            exact.push(r);
        } else if is_post && r.single_unnamed_type().is_some_and(|t| fallback_types.contains(&t)) {
            fallback.push(r);
        }
    }
    let ambiguous = |procs: &[Routine]| {
        let list = procs
            .iter()
            .map(|p| {
                let args = p.params.iter().map(|a| format!("{} => {}", a.name, a.ty)).collect::<Vec<_>>().join(", ");
                format!("{}.{}({args})", p.schema, p.name)
            })
            .collect::<Vec<_>>()
            .join(", ");
        ErrorResponse::pgrst(
            300,
            "PGRST203",
            format!("Could not choose the best candidate function between: {list}"),
            None,
            Some(
                "Try renaming the parameters or the function itself in the database so function overloading can be resolved"
                    .to_owned(),
            ),
        )
    };
    match (exact.len(), fallback.len()) {
        (1, _) => Ok(exact.remove(0)),
        (0, 1) => Ok(fallback.remove(0)),
        (0, 0) => {
            let func = format!("{schema}.{name}");
            let prms = if keys.is_empty() {
                " without parameters".to_owned()
            } else {
                format!(" with parameters {}", ident_list(keys))
            };
            let message = if keys.is_empty() {
                format!("Could not find the function {func} without parameters in the schema cache")
            } else {
                format!("Could not find the function {func}({}) in the schema cache", ident_list(keys))
            };
            let searched = match body_kind {
                BodyKind::Text => " with a single unnamed text parameter".to_owned(),
                BodyKind::Xml => " with a single unnamed xml parameter".to_owned(),
                BodyKind::Octet => " with a single unnamed bytea parameter".to_owned(),
                BodyKind::Json => format!("{prms} or with a single unnamed json/jsonb parameter"),
                BodyKind::Form | BodyKind::Query => prms,
            };
            Err(ErrorResponse::pgrst(
                404,
                "PGRST202",
                message,
                Some(format!(
                    "Searched for the function {func}{searched}, but no matches were found in the schema cache."
                )),
                None,
            ))
        }
        (0, _) => Err(ambiguous(&fallback)),
        _ => Err(ambiguous(&exact)),
    }
}
