//! Every config the repo ships parses and validates.

use relayd::Config;

#[test]
fn every_shipped_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "ron") {
            let settings = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!settings.routes.is_empty(), "{} has no routes", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 1, "no .ron file found in {}", dir.display());
}
