//! Model weights between safetensors bytes (what the artifact store holds) and the named
//! f32 tensors the aggregation strategies work on.

use consilium_core::aggregate::{Tensor, Weights};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

pub fn from_safetensors(bytes: &[u8]) -> Result<Weights, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let mut out = Weights::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor {name} is {:?}; only f32 weights are aggregated",
                view.dtype()
            ));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name, Tensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
}

pub fn to_safetensors(weights: &Weights) -> Result<Vec<u8>, String> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.shape.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (n.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}
