//! Tidy checks over the library's source: the project's standards, as
//! tests.
//!
//! - every `unsafe` block has a `// SAFETY:` comment just above it;
//! - every `unsafe fn` has a `# Safety` section in its docs;
//! - every naked function documents its register contract;
//! - no asm string holds a numeric memory offset (offsets are named
//!   `const` operands).

use std::fs;
use std::path::Path;

/// Every `.rs` file under `src/`, with its text.
fn sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((p.display().to_string(), fs::read_to_string(&p).unwrap()));
            }
        }
    }
    assert!(out.len() >= 5, "found too few sources: {out:?}");
    out
}

/// The doc comment and attribute lines directly above line `i`.
fn header_above(lines: &[&str], i: usize) -> String {
    let mut j = i;
    let mut doc = Vec::new();
    while j > 0 {
        let l = lines[j - 1].trim_start();
        if l.starts_with("///") || l.starts_with("#[") {
            doc.push(l);
            j -= 1;
        } else {
            break;
        }
    }
    doc.reverse();
    doc.join("\n")
}

#[test]
fn every_unsafe_block_has_a_safety_comment() {
    let mut bad = Vec::new();
    for (path, text) in sources() {
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let code = l.split("//").next().unwrap();
            let opens_block = code.contains("unsafe {")
                && !code.contains("unsafe fn")
                && !code.trim_start().starts_with("unsafe impl");
            if !opens_block {
                continue;
            }
            // The comment may sit above the statement the block is in.
            let above = lines[i.saturating_sub(8)..i].join("\n");
            if !above.contains("// SAFETY:") {
                bad.push(format!("{path}:{}: {}", i + 1, l.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "unsafe blocks without // SAFETY:\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_unsafe_fn_documents_its_safety_contract() {
    let mut bad = Vec::new();
    for (path, text) in sources() {
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let is_unsafe_fn = l.contains("unsafe fn ") || l.contains("unsafe extern \"C\" fn ");
            if is_unsafe_fn && !header_above(&lines, i).contains("# Safety") {
                bad.push(format!("{path}:{}: {}", i + 1, l.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "unsafe fns without # Safety:\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_naked_function_documents_its_register_contract() {
    let mut count = 0;
    for (path, text) in sources() {
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.trim() == "#[unsafe(naked)]" {
                count += 1;
                let doc = header_above(&lines, i + 1);
                for needle in [
                    "Register contract",
                    "- in:",
                    "- out",
                    "- clobbered:",
                    "- stack:",
                    "# Safety",
                ] {
                    assert!(
                        doc.contains(needle),
                        "{path}:{}: naked fn docs lack {needle:?}",
                        i + 1
                    );
                }
            }
        }
    }
    assert!(
        count >= 6,
        "expected the six switch routines, found {count} naked fns"
    );
}

#[test]
fn asm_strings_hold_no_numeric_offsets() {
    let mut bad = Vec::new();
    for (path, text) in sources() {
        for (i, l) in text.lines().enumerate() {
            let t = l.trim_start();
            if !t.starts_with('"') {
                continue;
            }
            let s = t.split("//").next().unwrap();
            // A memory operand with a literal displacement: `[reg + 16]`.
            let literal_disp = s.split('[').skip(1).any(|operand| {
                let inside = operand.split(']').next().unwrap_or("");
                inside
                    .split(['+', '-'])
                    .skip(1)
                    .any(|term| term.trim().starts_with(|c: char| c.is_ascii_digit()))
            });
            // CFI or stack adjustments by a literal amount.
            let literal_adjust = [
                ".cfi_adjust_cfa_offset ",
                ".cfi_offset ",
                ".cfi_def_cfa ",
                "sub rsp, ",
                "add rsp, ",
            ]
            .iter()
            .any(|d| s.contains(d) && s.chars().any(|c| c.is_ascii_digit()) && !s.contains('{'));
            if literal_disp || literal_adjust {
                bad.push(format!("{path}:{}: {}", i + 1, l.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "numeric offsets in asm strings:\n{}",
        bad.join("\n")
    );
}
