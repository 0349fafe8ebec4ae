//! Host-side bindings for the `kiln:executor` contract (plugins/wit), generated
//! by wasmtime.
//!
//! Imports are `trappable`, so every host function returns
//! `wasmtime::Result<…>`: the outer error traps the plugin (used when the
//! runner stops listening), the inner `Result` (for `run-command`) is the
//! error the plugin sees.

// The generated glue uses `unsafe` (it checks the component's types once,
// then calls functions without re-checking), and it emits the whole API and
// some unused parameters whether or not the host needs them. rustc does not
// lint a proc macro's output, so these only matter when
// `WASMTIME_DEBUG_BINDGEN=1` makes the macro include its output from a file
// (to read it, or to get better compiler errors). They are `allow`, not
// `expect`, because normally nothing fires.
#![allow(unsafe_code, reason = "wasmtime's generated bindings use unchecked typed functions")]
#![allow(dead_code, reason = "bindgen generates the whole API; the host uses part of it")]
#![allow(unused_variables, reason = "generated linker glue for an interface without functions")]

wasmtime::component::bindgen!({
    path: "../../plugins/wit",
    world: "plugin",
    imports: { default: async | trappable },
    exports: { default: async },

});
