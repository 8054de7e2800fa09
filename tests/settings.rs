//! Each setting's default is written once, in the code: `--help`, the packaged TOML and the
//! README's settings table must all show what `Config::default()` holds.

use grouprelay::config::settings::shown_defaults;

/// The package sets these itself (an uncommented key in the TOML), on purpose.
const PACKAGE_CHOICES: &[&str] = &["listen", "admin-group"];

fn repo_file(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A TOML value as a flag would write it: lists comma-joined, strings bare.
fn as_flag_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => items
            .iter()
            .map(as_flag_value)
            .collect::<Vec<_>>()
            .join(","),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => panic!("no setting takes {other:?}"),
    }
}

#[test]
fn help_shows_each_default() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_grouprelay"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for (key, default) in shown_defaults() {
        let flag = format!("--{key} ");
        let line = help
            .lines()
            .find(|line| line.trim_start().starts_with(&flag))
            .unwrap_or_else(|| panic!("--help has no line for --{key}:\n{help}"));
        let Some(default) = default else { continue };
        assert!(
            line.contains(&format!("[default: {default}]")),
            "--help should show --{key}'s default {default}: {line}"
        );
    }
}

#[test]
fn the_packaged_toml_shows_each_default() {
    let text = repo_file("packaging/grouprelay.toml");
    for (key, default) in shown_defaults() {
        let line = text
            .lines()
            .map(|line| line.trim_start_matches('#').trim_start())
            .find(|line| line.split('=').next().map(str::trim) == Some(&*key))
            .unwrap_or_else(|| panic!("packaging/grouprelay.toml does not mention {key}"));
        let commented = text
            .lines()
            .any(|l| l.starts_with('#') && l.trim_start_matches('#').trim_start() == line);
        if !commented {
            assert!(
                PACKAGE_CHOICES.contains(&key.as_str()),
                "the package sets {key}; as a default it should be commented out"
            );
            continue;
        }
        let Some(default) = default else { continue };
        let value: toml::Table = toml::from_str(line)
            .unwrap_or_else(|e| panic!("packaging/grouprelay.toml: {line}: {e}"));
        assert_eq!(
            as_flag_value(&value[&key]),
            default,
            "packaging/grouprelay.toml shows another default for {key}"
        );
    }
}

#[test]
fn the_readme_table_shows_each_default() {
    let readme = repo_file("README.md");
    for (key, default) in shown_defaults() {
        let row = readme
            .lines()
            .find(|line| {
                line.starts_with(&format!("| `--{key} "))
                    || line.starts_with(&format!("| `--{key}`"))
            })
            .unwrap_or_else(|| panic!("the README's settings table has no row for --{key}"));
        let Some(default) = default else { continue };
        // A cell may hold an escaped `\|` (`fsync\|interval`).
        let row = row.replace("\\|", "/");
        let cell = row.split('|').nth(2).unwrap_or_default();
        let shown = cell.split('`').nth(1).unwrap_or_default();
        assert_eq!(
            shown, default,
            "the README shows another default for --{key}: {row}"
        );
    }
}

/// `--memory-profile` takes `lean` or `throughput`, from a flag, a `GROUPRELAY_*` variable or
/// the file; anything else is a configuration error (exit 2) that names both choices.
#[test]
fn memory_profile_is_lean_or_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |args: &[&str], env: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_grouprelay"))
            .arg("validate")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(args)
            .env_remove("GROUPRELAY_MEMORY_PROFILE")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(
        validate(&["--memory-profile", "throughput"], &[]).0,
        Some(0)
    );
    assert_eq!(validate(&["--memory-profile", "lean"], &[]).0, Some(0));
    assert_eq!(
        validate(&[], &[("GROUPRELAY_MEMORY_PROFILE", "throughput")]).0,
        Some(0)
    );
    let file = dir.path().join("grouprelay.toml");
    std::fs::write(&file, "memory-profile = \"throughput\"\n").unwrap();
    assert_eq!(
        validate(&["--config", file.to_str().unwrap()], &[]).0,
        Some(0)
    );

    let (code, stderr) = validate(&["--memory-profile", "fast"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--memory-profile") && stderr.contains("\"lean\" or \"throughput\""),
        "{stderr}"
    );
    std::fs::write(&file, "memory-profile = \"fast\"\n").unwrap();
    let (code, stderr) = validate(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("grouprelay.toml") && stderr.contains("`lean` or `throughput`"),
        "{stderr}"
    );
}
