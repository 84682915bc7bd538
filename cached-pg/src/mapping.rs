//! The mapping from rows to cache entries: for each table, the key and tag
//! templates of the attribute, filled from the row's columns instead of the
//! function's arguments, and rendered by `redis_cached::tag` (the function
//! that renders the attribute's templates), so the two cannot disagree.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use pg_walstream::{ColumnValue, RowData};
use redis_cached::CacheKey;

use crate::error::Error;

/// Which rows of which tables make which cache entries: a list of
/// [`Table`]s.
///
/// ```
/// use redis_cached_pg::{Mapping, Table};
///
/// let mapping = Mapping::new()
///     .table(
///         Table::new("users", "users")
///             .key("user:<id>")
///             .tag("team:<team_id>"),
///     )
///     .table(Table::new("shop.orders", "orders").tag("orders-of:<user_id>"));
/// # let _ = mapping;
/// ```
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    tables: Vec<Table>,
}

impl Mapping {
    /// An empty mapping.
    pub fn new() -> Mapping {
        Mapping::default()
    }

    /// Adds `table`.
    pub fn table(mut self, table: Table) -> Mapping {
        self.tables.push(table);
        self
    }

    /// The tables, in the order they were added.
    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// Checks every template and compiles the mapping.
    pub(crate) fn compile(&self) -> Result<Plan, Error> {
        if self.tables.is_empty() {
            return Err(Error::Mapping("the mapping has no table".into()));
        }
        let mut tables = HashMap::new();
        for table in &self.tables {
            let plan = TablePlan::compile(table)?;
            let name = (table.schema.clone(), table.name.clone());
            if tables.insert(name, plan).is_some() {
                return Err(Error::Mapping(format!(
                    "table {}.{} is mapped twice",
                    table.schema, table.name
                )));
            }
        }
        Ok(Plan { tables })
    }
}

/// One table of a [`Mapping`]: the key and tag templates that its rows
/// fill, with the table's column names as placeholders.
///
/// The templates are those of the attribute, character for character:
/// `#[redis_cached(key = "user:<id>", tags = ["team:<team>", "users"])]`
/// on `async fn user(id: i64, team: i64)` and `Table::new("users",
/// "users").key("user:<id>").tag("team:<team_id>")` name the same entries
/// when the table's `id` and `team_id` columns hold what the function's
/// `id` and `team` arguments hold.
///
/// The table's *table tag* (`"users"` above) is the one tag that reaches
/// every entry made from the table's rows, whatever its key: it is what a
/// `TRUNCATE`, a lost replication slot, or a change whose old values the
/// database did not send (see [`Table::tag`]) invalidates. List it in the
/// `tags` of every cached function whose value is made from the table's
/// rows; an entry without it is reached only by the keys and tags its row
/// renders.
#[derive(Debug, Clone)]
pub struct Table {
    schema: String,
    name: String,
    all: String,
    keys: Vec<(String, Option<u32>)>,
    tags: Vec<String>,
}

impl Table {
    /// The table `name` (`"users"`, in schema `public`, or
    /// `"schema.table"`; names as Postgres stores them, unquoted), whose
    /// entries all list the tag `table_tag`.
    pub fn new(name: &str, table_tag: &str) -> Table {
        let (schema, name) = match name.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", name),
        };
        Table {
            schema: schema.to_owned(),
            name: name.to_owned(),
            all: table_tag.to_owned(),
            keys: Vec::new(),
            tags: Vec::new(),
        }
    }

    /// A key template: a changed row invalidates the key it renders (for
    /// an `UPDATE`, the key of the old row and of the new one).
    pub fn key(mut self, template: &str) -> Table {
        self.keys.push((template.to_owned(), None));
        self
    }

    /// A key template of a function with `version = n`: the key it renders,
    /// with the version as the attribute adds it.
    pub fn versioned_key(mut self, template: &str, version: u32) -> Table {
        self.keys.push((template.to_owned(), Some(version)));
        self
    }

    /// A tag template: a changed row invalidates the tag it renders (for an
    /// `UPDATE`, the tag of the old row and of the new one, so that a row
    /// moved from one tag to another invalidates both).
    ///
    /// An `UPDATE` or `DELETE` sends the old row's columns only as far as
    /// the table's replica identity holds them: all of them with `ALTER
    /// TABLE … REPLICA IDENTITY FULL`, else the primary key's (and those
    /// only when the key changed). A template on other columns then cannot
    /// be rendered for the old row, and the listener invalidates the table
    /// tag instead: correct, but it drops every entry of the table. Give
    /// such tables `REPLICA IDENTITY FULL`.
    pub fn tag(mut self, template: &str) -> Table {
        self.tags.push(template.to_owned());
        self
    }

    /// The schema and name of the table.
    pub fn name(&self) -> (&str, &str) {
        (&self.schema, &self.name)
    }

    /// The table tag.
    pub fn table_tag(&self) -> &str {
        &self.all
    }
}

/// The compiled mapping: tables by schema and name.
#[derive(Debug)]
pub(crate) struct Plan {
    tables: HashMap<(String, String), TablePlan>,
}

impl Plan {
    pub(crate) fn table(&self, schema: &str, name: &str) -> Option<&TablePlan> {
        // Few tables: a scan is as fast as hashing a borrowed pair.
        self.tables
            .iter()
            .find(|((s, n), _)| s == schema && n == name)
            .map(|(_, plan)| plan)
    }

    /// The tables, by schema and name.
    pub(crate) fn tables(&self) -> impl Iterator<Item = (&(String, String), &TablePlan)> {
        self.tables.iter()
    }
}

/// One template, with the columns its placeholders name, in order.
#[derive(Debug, Clone)]
struct Template {
    text: String,
    columns: Vec<String>,
    version: Option<u32>,
}

impl Template {
    fn compile(text: &str, version: Option<u32>) -> Result<Template, Error> {
        let columns = placeholders(text);
        // The runtime checks the template as the attribute does: render
        // it once with stand-in values.
        let stand_ins: Vec<&dyn CacheKey> = columns.iter().map(|_| &0u8 as &dyn CacheKey).collect();
        redis_cached::tag(text, &stand_ins)
            .map_err(|err| Error::Mapping(format!("template {text:?}: {err}")))?;
        Ok(Template {
            text: text.to_owned(),
            columns,
            version,
        })
    }

    /// The template rendered with `values`, one per column.
    fn render(&self, values: &[Part<'_>]) -> Option<String> {
        let parts: Vec<&dyn CacheKey> = values.iter().map(|v| v as &dyn CacheKey).collect();
        let mut rendered = redis_cached::tag(&self.text, &parts).ok()?;
        if let Some(version) = self.version {
            // As the attribute ends a versioned key.
            let _ = write!(rendered, "@v{version}");
        }
        Some(rendered)
    }
}

/// The names between `<` and `>`, in order (the runtime checks the rest).
fn placeholders(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find('>') else { break };
        names.push(rest[..close].to_owned());
        rest = &rest[close + 1..];
    }
    names
}

/// One table's compiled templates.
#[derive(Debug)]
pub(crate) struct TablePlan {
    /// The table tag.
    pub(crate) all: String,
    keys: Vec<Template>,
    tags: Vec<Template>,
}

impl TablePlan {
    fn compile(table: &Table) -> Result<TablePlan, Error> {
        if table.schema.is_empty() || table.name.is_empty() {
            return Err(Error::Mapping(format!(
                "table name {:?}.{:?} is empty",
                table.schema, table.name
            )));
        }
        let all = Template::compile(&table.all, None)?;
        if !all.columns.is_empty() {
            return Err(Error::Mapping(format!(
                "the table tag {:?} of {}.{} has placeholders: it must name the whole table",
                table.all, table.schema, table.name
            )));
        }
        let keys = table
            .keys
            .iter()
            .map(|(text, version)| Template::compile(text, *version))
            .collect::<Result<_, _>>()?;
        let tags = table
            .tags
            .iter()
            .map(|text| Template::compile(text, None))
            .collect::<Result<_, _>>()?;
        Ok(TablePlan {
            all: table.all.clone(),
            keys,
            tags,
        })
    }

    /// Every column a template of this table names.
    pub(crate) fn columns(&self) -> HashSet<&str> {
        self.keys
            .iter()
            .chain(&self.tags)
            .flat_map(|t| t.columns.iter().map(String::as_str))
            .collect()
    }

    /// What a `TRUNCATE` of the table invalidates: the table tag, and the
    /// templates without placeholders.
    pub(crate) fn whole(&self, into: &mut Targets) {
        into.tags.insert(self.all.clone());
        for key in self.keys.iter().filter(|t| t.columns.is_empty()) {
            if let Some(key) = key.render(&[]) {
                into.keys.insert(key);
            }
        }
        for tag in self.tags.iter().filter(|t| t.columns.is_empty()) {
            if let Some(tag) = tag.render(&[]) {
                into.tags.insert(tag);
            }
        }
    }

    /// Adds what one version of a row renders; `false` when a column of
    /// some template is not known in it (the caller then invalidates the
    /// table tag).
    pub(crate) fn row(&self, row: &Row<'_>, into: &mut Targets) -> bool {
        let mut complete = true;
        let mut values = Vec::new();
        for (template, keys) in self
            .keys
            .iter()
            .map(|t| (t, true))
            .chain(self.tags.iter().map(|t| (t, false)))
        {
            values.clear();
            for column in &template.columns {
                match row.value(column) {
                    Some(value) => values.push(value),
                    None => break,
                }
            }
            let rendered = (values.len() == template.columns.len())
                .then(|| template.render(&values))
                .flatten();
            match rendered {
                Some(rendered) if keys => {
                    into.keys.insert(rendered);
                }
                Some(rendered) => {
                    into.tags.insert(rendered);
                }
                None => complete = false,
            }
        }
        complete
    }
}

/// The keys and tags to invalidate.
#[derive(Debug, Default)]
pub(crate) struct Targets {
    pub(crate) keys: HashSet<String>,
    pub(crate) tags: HashSet<String>,
}

impl Targets {
    pub(crate) fn len(&self) -> usize {
        self.keys.len() + self.tags.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.tags.is_empty()
    }
}

/// A table's columns as the last `Relation` message described them.
#[derive(Debug, Clone)]
pub(crate) struct Columns {
    /// Type OID by column name.
    types: HashMap<String, u32>,
    /// The replica identity's columns.
    key: HashSet<String>,
}

impl Columns {
    pub(crate) fn new(columns: &[pg_walstream::RelationColumn]) -> Columns {
        Columns {
            types: columns
                .iter()
                .map(|c| (c.name.to_string(), c.type_id))
                .collect(),
            key: columns
                .iter()
                .filter(|c| c.is_key)
                .map(|c| c.name.to_string())
                .collect(),
        }
    }

    /// The columns of `plan`'s templates that the table lacks.
    pub(crate) fn missing<'p>(&self, plan: &'p TablePlan) -> Vec<&'p str> {
        let mut missing: Vec<&str> = plan
            .columns()
            .into_iter()
            .filter(|c| !self.types.contains_key(*c))
            .collect();
        missing.sort_unstable();
        missing
    }

    /// Whether the replica identity holds `column`.
    pub(crate) fn is_key(&self, column: &str) -> bool {
        self.key.contains(column)
    }
}

/// One version of a row (old or new) as far as the change carries it.
pub(crate) struct Row<'a> {
    pub(crate) columns: &'a Columns,
    /// Where each column's value is looked up first.
    pub(crate) first: Option<&'a RowData>,
    /// Where a column missing from `first` is looked up next.
    pub(crate) then: Option<&'a RowData>,
    /// Whether a column missing from both is the replica identity's
    /// unchanged value, to be read from `then` (the old row of an `UPDATE`
    /// that did not change its key, which Postgres does not send).
    pub(crate) key_from_then: bool,
}

impl<'a> Row<'a> {
    /// The column's value as the attribute would render it.
    fn value(&self, column: &str) -> Option<Part<'a>> {
        let type_id = *self.columns.types.get(column)?;
        let found = self
            .first
            .and_then(|row| row.get(column))
            .or_else(|| {
                // An old row that Postgres did not send (no key change):
                // its key columns are the new row's.
                (self.key_from_then && self.columns.is_key(column))
                    .then(|| self.then.and_then(|row| row.get(column)))
                    .flatten()
            })
            .or_else(|| {
                // A column absent from the new row is an unchanged TOAST
                // value: the old row (`REPLICA IDENTITY FULL`) has it.
                (!self.key_from_then)
                    .then(|| self.then.and_then(|row| row.get(column)))
                    .flatten()
            })?;
        Part::parse(type_id, found)
    }
}

/// A column value, typed as the attribute's argument would be: integers,
/// booleans and floats as numbers, SQL `NULL` as `None`, anything else as
/// its Postgres text.
#[derive(Debug, Clone, Copy)]
enum Part<'a> {
    Null,
    Int(i64),
    Bool(bool),
    F32(f32),
    F64(f64),
    Text(&'a str),
}

/// Postgres type OIDs (`pg_type.oid`), fixed since forever.
mod oid {
    pub const BOOL: u32 = 16;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
}

impl<'a> Part<'a> {
    fn parse(type_id: u32, value: &'a ColumnValue) -> Option<Part<'a>> {
        let text = match value {
            ColumnValue::Null => return Some(Part::Null),
            ColumnValue::Text(_) => value.as_str()?,
            // Binary mode is never asked for.
            ColumnValue::Binary(_) => return None,
        };
        Some(match type_id {
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => Part::Int(text.parse().ok()?),
            oid::BOOL => match text {
                "t" => Part::Bool(true),
                "f" => Part::Bool(false),
                _ => return None,
            },
            oid::FLOAT4 => Part::F32(text.parse().ok()?),
            oid::FLOAT8 => Part::F64(text.parse().ok()?),
            _ => Part::Text(text),
        })
    }
}

impl CacheKey for Part<'_> {
    fn write_key(&self, out: &mut String) {
        // Each as the runtime encodes the Rust type it stands for.
        match self {
            Part::Null => None::<i64>.write_key(out),
            Part::Int(v) => v.write_key(out),
            Part::Bool(v) => v.write_key(out),
            Part::F32(v) => v.write_key(out),
            Part::F64(v) => v.write_key(out),
            Part::Text(v) => v.write_key(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_walstream::RelationColumn;
    use std::sync::Arc;

    fn column(name: &str, type_id: u32, is_key: bool) -> RelationColumn {
        RelationColumn {
            name: Arc::from(name),
            type_id,
            type_modifier: -1,
            is_key,
        }
    }

    fn users() -> (TablePlan, Columns) {
        let table = Table::new("users", "users")
            .key("user:<id>")
            .versioned_key("profile:<id>", 3)
            .tag("team:<team_id>")
            .tag("name:<name>:<active>:<score>")
            .tag("everyone");
        let columns = Columns::new(&[
            column("id", oid::INT8, true),
            column("team_id", oid::INT4, false),
            column("name", 25, false),
            column("active", oid::BOOL, false),
            column("score", oid::FLOAT8, false),
        ]);
        (TablePlan::compile(&table).unwrap(), columns)
    }

    fn row(pairs: &[(&str, Option<&str>)]) -> RowData {
        RowData::from_pairs(
            pairs
                .iter()
                .map(|(name, value)| (*name, value.map_or(ColumnValue::Null, ColumnValue::text)))
                .collect(),
        )
    }

    #[test]
    fn renders_as_the_attribute_renders_the_arguments() {
        let (plan, columns) = users();
        let new = row(&[
            ("id", Some("42")),
            ("team_id", None),
            ("name", Some("Ada L")),
            ("active", Some("t")),
            ("score", Some("1e+20")),
        ]);
        let mut targets = Targets::default();
        let complete = plan.row(
            &Row {
                columns: &columns,
                first: Some(&new),
                then: None,
                key_from_then: false,
            },
            &mut targets,
        );
        assert!(complete);
        let expect_user = redis_cached::tag("user:<id>", &[&42u64]).unwrap();
        let expect_team = redis_cached::tag("team:<t>", &[&None::<u32>]).unwrap();
        let expect_name =
            redis_cached::tag("name:<n>:<a>:<s>", &[&"Ada L", &true, &1e20f64]).unwrap();
        assert!(targets.keys.contains(&expect_user));
        assert!(targets.keys.contains("profile:42@v3"));
        assert!(targets.tags.contains(&expect_team), "{targets:?}");
        assert!(targets.tags.contains(&expect_name), "{targets:?}");
        assert!(targets.tags.contains("everyone"));
        assert_eq!(targets.len(), 5);
    }

    #[test]
    fn an_old_row_without_its_columns_is_incomplete() {
        let (plan, columns) = users();
        let new = row(&[
            ("id", Some("1")),
            ("team_id", Some("2")),
            ("name", Some("a")),
            ("active", Some("f")),
            ("score", Some("0")),
        ]);
        // REPLICA IDENTITY DEFAULT, key unchanged: no old row; the key
        // column is the new row's, the others are unknown.
        let mut targets = Targets::default();
        let complete = plan.row(
            &Row {
                columns: &columns,
                first: None,
                then: Some(&new),
                key_from_then: true,
            },
            &mut targets,
        );
        assert!(!complete);
        assert!(targets.keys.contains("user:1"));
        assert!(!targets.tags.contains("team:2"));
    }

    #[test]
    fn an_unchanged_toast_value_comes_from_the_old_row() {
        let (plan, columns) = users();
        let old = row(&[
            ("id", Some("1")),
            ("team_id", Some("2")),
            ("name", Some("long")),
            ("active", Some("f")),
            ("score", Some("0.5")),
        ]);
        // The new row lacks `name` (unchanged TOAST).
        let new = row(&[
            ("id", Some("1")),
            ("team_id", Some("3")),
            ("active", Some("f")),
            ("score", Some("0.5")),
        ]);
        let mut targets = Targets::default();
        assert!(plan.row(
            &Row {
                columns: &columns,
                first: Some(&new),
                then: Some(&old),
                key_from_then: false,
            },
            &mut targets,
        ));
        assert!(targets.tags.contains("team:3"));
        assert!(targets.tags.contains("name:long:false:0.5"), "{targets:?}");
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            Table::new("t", "all").key("user:<id"),
            Table::new("t", "all").tag("a:<x><y>"),
            Table::new("t", "all:<x>"),
            Table::new("t", "a b"),
        ] {
            assert!(
                Mapping::new().table(bad.clone()).compile().is_err(),
                "{bad:?}"
            );
        }
        assert!(Mapping::new().compile().is_err());
        let twice = Mapping::new()
            .table(Table::new("t", "a"))
            .table(Table::new("public.t", "b"));
        assert!(twice.compile().is_err());
    }

    #[test]
    fn truncate_names_the_table_tag_and_the_fixed_templates() {
        let (plan, _) = users();
        let mut targets = Targets::default();
        plan.whole(&mut targets);
        assert_eq!(
            targets.tags,
            HashSet::from(["users".to_owned(), "everyone".to_owned()])
        );
        assert!(targets.keys.is_empty());
    }
}
