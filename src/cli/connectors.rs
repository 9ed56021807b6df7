//! `apijongler connectors`: the known connectors, where each comes from, how its key is sent.

use std::io::Write;
use std::process::ExitCode;

use api_jongler::Connectors;
use api_jongler::connector::Origin;

use super::{Global, output};

pub fn run(global: &Global) -> anyhow::Result<ExitCode> {
    let connectors = Connectors::load(global.connectors.as_deref())?;
    let mut stdout = std::io::stdout().lock();
    let describe_key = |c: &api_jongler::Connector| {
        if !c.requires_api_key {
            return "no key".to_owned();
        }
        let (header, prefix) = c.key_header();
        format!("{header}: {prefix}<key>")
    };
    let origin = |c: &api_jongler::Connector| match &c.origin {
        Origin::Embedded => "built in".to_owned(),
        Origin::File(path) => path.display().to_string(),
        Origin::Merged(path) => format!("built in, merged with {}", path.display()),
    };
    // A connector without `api` infers its family per request.
    let api = |c: &api_jongler::Connector| c.api.map_or("per request", |family| family.word());
    if global.json {
        let rows: Vec<_> = connectors
            .iter()
            .map(|c| {
                let api = c.api.map(|family| family.word());
                serde_json::json!({"name": c.name, "base_url": c.base_url(), "api": api, "key": describe_key(c), "origin": origin(c)})
            })
            .collect();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = output::table(&["connector", "base URL", "api", "key sent as", "from"]);
    for c in connectors.iter() {
        table.add_row(vec![c.name.clone(), c.base_url(), api(c).to_owned(), describe_key(c), origin(c)]);
    }
    writeln!(stdout, "{table}")?;
    Ok(ExitCode::SUCCESS)
}
