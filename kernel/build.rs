//! Links the kernel with the project's linker script.
fn main() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../linker/x86_64.ld")
        .canonicalize()
        .expect("linker/x86_64.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}
