// The CUDA kernels of the backend, one launch function per op (defined in the .cu file of the same name); the
// backend (cuda_backend.cpp) checks every launch. Plain host types in the signatures, so that the C++ host code
// includes this without nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../device_plan.hpp"

namespace fastspec::cuda {

enum class Elem { f32, f16, bf16 };  // the dtype of the weights and hidden activations

// output_epilogue.cu ------------------------------------------------------------------------------------------------
// dst[r, p] = scale * sigmoid(logits[r, p]) + offset for r < rows, p < n_pixels. dst == nullptr: the destination is
// read on the device from *dst_slot (the chunk's output pointer, uploaded with the input rows, so that a captured
// graph writes wherever the current call wants).
void launch_sigmoid_output(const float* logits, std::size_t rows, std::size_t n_pixels, float scale, float offset,
                           float* dst, float* const* dst_slot, cudaStream_t stream);

// y[c, i] = act(x[c, i] + bias[i]) for c < cols, i < width (column-major activations: width values per column),
// act = ReLU or identity, bias == nullptr: none; x in x_elem, y in y_elem (converted, round to nearest), bias
// float32. x == y (same dtype) works in place. Applies a bias cuBLASLt could not fuse, and converts the first
// layer's float32 output of a 16-bit model to the hidden dtype.
void launch_bias_act(const void* x, Elem x_elem, void* y, Elem y_elem, const float* bias, std::size_t cols, int width,
                     bool relu, cudaStream_t stream);

constexpr int kMaxNetworkLabels = 32;
struct NetworkLabels {
    int n = 0;                       // tangents per row
    int label[kMaxNetworkLabels] = {};  // the label index of tangent t
};
// The last layer of forward_jacobian: s = sigmoid(logits), flux = scale s + offset, and the tangents
// G[(r, t), p] = scale s (1 - s) * tangents[(r, t), p] * tangent_scale[r, t]. broadening: flux into flux_dst and G in
// place into tangents (the broadening stage then broadens both). Else flux into *slots[0] and the Jacobian
// (rows, n_pixels, n_labels) into *slots[1]: G in the network labels' columns, 0 in the others.
void launch_jacobian_output(const float* logits, float* tangents, const float* tangent_scale, std::size_t rows,
                            std::size_t n_pixels, int n_labels, const NetworkLabels& net, float scale, float offset,
                            bool broadening, float* flux_dst, float* const* slots, cudaStream_t stream);

// tangent.cu --------------------------------------------------------------------------------------------------------
// The input tangents of forward_jacobian: row (r * nt + t) of t_in (rows * nt, input_dim) is the unit vector of
// column latent_dim + t (tangents are carried per unit of normalised label; tangent_scale converts at the end).
void launch_unit_tangents(void* t_in, Elem elem, std::size_t rows, int nt, int input_dim, int latent_dim,
                          cudaStream_t stream);
// ReLU's derivative: t[(r, t), i] = 0 where h[r, i] <= 0 (h: the layer's output after ReLU), for t < nt, i < width.
void launch_relu_mask(void* t, const void* h, Elem elem, std::size_t rows, int nt, int width, cudaStream_t stream);

// broaden.cu --------------------------------------------------------------------------------------------------------
// The broadening stage (BroadeningStage::apply) on many rows and planes at once. A plane is one spectrum-sized
// input (the flux, or tangent t of the row) under one of the row's kernels (flux, d/dvsini, d/dR), written to out
// (row stride n_pixels) or to one column of the Jacobian (row stride n_pixels * n_labels, pixel stride n_labels).
struct BroadenPlane {
    int src;       // -1: flux, t >= 0: tangent t
    int which;     // 0: flux kernels, 1: d/dvsini, 2: d/dR, 3: d/dvmac
    int dst;       // -1: out, -2: jacobian_vmac (row stride n_pixels), j >= 0: Jacobian column j
    int zero_bit;  // the plane is 0 where the row record's zero & zero_bit (a clamped label)
};
struct BroadenArgs {
    const float* flux = nullptr;      // (rows, n_pixels)
    const float* tangents = nullptr;  // (rows, nt, n_pixels)
    int nt = 0, n_pixels = 0, n_labels = 0, n_nodes = 0, kernels_per_row = 1;
    const detail::device_plan::RowRecord* records = nullptr;  // (rows)
    const int* node_half = nullptr;                   // (rows, n_nodes)
    const float* taps = nullptr;                      // records[r].taps: (kernels_per_row, n_nodes, 2 half + 1)
    const int* node_lo = nullptr;                     // the model's node layout (n_nodes each)
    const int* node_hi = nullptr;
    const int* hat_offset = nullptr;
    const float* hat = nullptr;
    const BroadenPlane* planes = nullptr;  // (n_planes), device memory
    int n_planes = 0;
    float* out = nullptr;
    float* jacobian = nullptr;
    float* jacobian_vmac = nullptr;  // (rows, n_pixels), the plane with dst -2
};
// max_half: the largest records[r].half of these rows (sizes the shared memory). Returns the bytes of dynamic shared
// memory it asked for (the caller raised the kernel's limit to broaden_shared_limit() once).
void launch_broaden(const BroadenArgs& args, std::size_t rows, int max_half, cudaStream_t stream);
// Raise the kernel's dynamic shared memory limit to what max_half needs; false if the device cannot give it.
bool broaden_reserve_shared(int max_half, int device_limit_bytes);

}  // namespace fastspec::cuda
