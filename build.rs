//! The git revision relayd is built from, for `relayd_build_info` and `--version`.

fn main() {
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|rev| rev.trim().to_string())
        .filter(|rev| !rev.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=RELAYD_REVISION={revision}");
    // A new commit (HEAD moves, or the branch it names does) changes the revision.
    for file in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(file).exists() {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
