//! A copy of one of the repository's examples in a temporary folder, as a node's config.

use std::path::Path;

/// The operator token written beside the copied config.
pub const OPERATOR: &str = "wop_test_operator_token_0123456789";

/// `examples/<name>`'s `files`, each passed through `edit`, in a new temporary folder with
/// an operator token written 0600, as `warden init` writes it (a secret others may read
/// is refused).
pub fn copy(name: &str, files: &[&str], edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policy")).unwrap();
    for f in files {
        let text = std::fs::read_to_string(example.join(f)).unwrap();
        std::fs::write(dir.path().join(f), edit(text)).unwrap();
    }
    warden_server::setup::write_secret(
        &dir.path().join("operator.token"),
        &format!("{OPERATOR}\n"),
    )
    .unwrap();
    dir
}
