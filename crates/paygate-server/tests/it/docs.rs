//! The ADRs name the tests that prove each decision; a renamed or deleted test
//! must not leave a reference that proves nothing.

use std::path::{Path, PathBuf};

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                rust_sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Backticked names on the lines that cite tests: under a heading that
/// mentions tests, or in a paragraph from "Test:"/"Tests:" to its end.
fn cited_tests(adr: &str) -> Vec<String> {
    let mut cited = Vec::new();
    let (mut in_section, mut in_paragraph) = (false, false);
    for line in adr.lines() {
        if line.starts_with('#') {
            in_section = line.to_lowercase().contains("test");
            in_paragraph = false;
            continue;
        }
        if line.contains("Test:") || line.contains("Tests:") {
            in_paragraph = true;
        }
        if line.trim().is_empty() {
            in_paragraph = false;
        }
        if !(in_section || in_paragraph) {
            continue;
        }
        for token in line.split('`').skip(1).step_by(2) {
            cited.push(token.strip_prefix("it ").unwrap_or(token).to_owned());
        }
    }
    cited
}

#[test]
fn every_test_an_adr_cites_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    rust_sources(&root.join("crates"), &mut files);
    let sources: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect::<Vec<_>>().join("\n");
    let defines = |name: &str| match name.strip_suffix('*') {
        Some(prefix) => sources.contains(&format!("fn {prefix}")),
        None => [format!("fn {name}("), format!("fn {name}<")].iter().any(|f| sources.contains(f)),
    };
    let mut adrs: Vec<PathBuf> = std::fs::read_dir(root.join("docs/adr")).unwrap().map(|e| e.unwrap().path()).collect();
    adrs.sort();
    let (mut names, mut missing) = (0, Vec::new());
    for adr in &adrs {
        for token in cited_tests(&std::fs::read_to_string(adr).unwrap()) {
            if token.ends_with(".rs") && token.contains('/') {
                // A test file, named by the end of its path.
                if !files.iter().any(|f| f.ends_with(&token)) {
                    missing.push(format!("{}: file {token}", adr.file_name().unwrap().to_string_lossy()));
                }
                continue;
            }
            let name = token.rsplit("::").next().unwrap();
            let looks_like_a_test = name.matches('_').count() >= 2
                && name.trim_end_matches('*').chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !token.contains([' ', '-', '.', '/']);
            if !looks_like_a_test {
                continue;
            }
            names += 1;
            if !defines(name) {
                missing.push(format!("{}: {token}", adr.file_name().unwrap().to_string_lossy()));
            }
        }
    }
    assert!(missing.is_empty(), "the ADRs cite tests that do not exist:\n{}", missing.join("\n"));
    // The scan really reads the citations (there are well over a hundred).
    assert!(names > 100, "only {names} test names found in {} ADRs", adrs.len());
}
