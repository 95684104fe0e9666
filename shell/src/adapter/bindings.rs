//! Host-side bindings of the adapter world (wit/v0.1.0). Every import may trap: a host function that
//! returns `Err` stops the adapter call, which is how sandbox limits are enforced.

wasmtime::component::bindgen!({
    path: "../wit/v0.1.0",
    world: "edgechat:adapter/adapter@0.1.0",
    imports: { default: trappable },
    with: {
        "edgechat:adapter/tensor.array": crate::host::tensor::TensorHandle,
    },
});
