//! Reading the schema and policy files named in the config.

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use warden_core::config::Settings;
use warden_core::policy::{PolicyBundle, PolicyError, Source};

fn read(path: &Path) -> Result<Source, PolicyError> {
    fs::read_to_string(path)
        .map(|text| Source {
            name: path.display().to_string(),
            text,
        })
        .map_err(|e| PolicyError {
            problems: vec![format!("{}: cannot read: {e}", path.display())],
        })
}

/// The policy files: the configured file, or every `.cedar` file in the configured folder,
/// in name order.
fn policy_paths(settings: &Settings) -> Result<Vec<std::path::PathBuf>, PolicyError> {
    let p = &settings.policies_path;
    if p.is_dir() {
        let mut paths: Vec<_> = fs::read_dir(p)
            .map_err(|e| PolicyError {
                problems: vec![format!("{}: cannot list: {e}", p.display())],
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
            .collect();
        paths.sort();
        Ok(paths)
    } else {
        Ok(vec![p.clone()])
    }
}

/// Reads and validates the policy in the config's files.
pub fn load(settings: &Settings) -> Result<PolicyBundle, PolicyError> {
    let schema = read(&settings.schema_file)?;
    let policies = policy_paths(settings)?
        .iter()
        .map(|p| read(p))
        .collect::<Result<Vec<_>, _>>()?;
    PolicyBundle::load(&schema, &policies, settings.tools.values())
}

/// A cheap fingerprint of the files' names, sizes and modification times, to notice edits.
pub fn stamp(settings: &Settings) -> Vec<(String, u64, Option<SystemTime>)> {
    let mut paths = policy_paths(settings).unwrap_or_default();
    paths.push(settings.schema_file.clone());
    paths
        .into_iter()
        .map(|p| {
            let meta = fs::metadata(&p).ok();
            (
                p.display().to_string(),
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            )
        })
        .collect()
}
