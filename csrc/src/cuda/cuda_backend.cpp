// The CUDA backend (backend.hpp): weights resident on the GPU in the file's dtype (the first layer of a 16-bit
// model in float32, see device_plan.hpp Dims::first_f32), cuBLASLt products with fused bias(+ReLU) epilogues (a
// bias kernel where cuBLASLt has no algorithm for the epilogue), one elementwise kernel for the sigmoid and output
// transform, the broadening stage and forward-mode tangents for forward_jacobian, CUDA graphs for repeated batch
// sizes. Built into
// libfastspec_cuda.so, which exports only fastspec_cuda_backend_module() (loaded by backend_loader.cpp).
//
// A call, chunk by chunk (device_plan.hpp sizes the chunks and buffers):
//   host:   the core's input rows (float32), the tangent scales and the chunk's output
//           pointers go into a pinned staging slot, the row's broadening kernels into another; two slots alternate,
//           so the host prepares chunk k + 1 while the GPU runs chunk k;
//   stream: copy the staging in; the network (a graph replay, or plain launches) on the workspace's fixed buffers;
//           the broadening kernel; for host callers, copy the result out.
// Concurrent calls take separate workspaces from a pool; a workspace last used on another stream makes the new
// stream wait for that work first (an event), so buffers are never shared by two streams at once.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../backend.hpp"
#include "../device_plan.hpp"
#include "ops.h"

namespace fastspec::cuda {

namespace dp = detail::device_plan;
using detail::NetworkSpec;

namespace {

// --- checked calls ---------------------------------------------------------------------------------------------------

[[noreturn]] void fail(cudaError_t e, const std::string& what) {
    cudaGetLastError();  // clear a sticky-free error so that later calls do not report it again
    throw DeviceError("CUDA error in " + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) fail(e, what);
}

void check_launch(const char* what) { check(cudaGetLastError(), what); }

void check_lt(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS)
        throw DeviceError(std::string("cuBLASLt error in ") + what + ": status " + std::to_string(int(s)));
}

std::string device_name(int device) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, device) != cudaSuccess) return "CUDA device " + std::to_string(device);
    return std::string(p.name) + " (cuda:" + std::to_string(device) + ", sm_" + std::to_string(p.major) +
           std::to_string(p.minor) + ")";
}

// Makes `device` current for the scope and restores the caller's device after (CuPy and torch rely on it).
class DeviceScope {
public:
    explicit DeviceScope(int device) {
        check(cudaGetDevice(&previous_), "cudaGetDevice");
        if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceScope() {
        int now = -1;
        if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
    }

private:
    int previous_ = 0;
};

struct DeviceBuffer {
    void* p = nullptr;
    std::size_t bytes = 0;
    ~DeviceBuffer() {
        if (p) cudaFree(p);
    }
    template <class T = void>
    T* as(std::size_t byte_offset = 0) const {
        return reinterpret_cast<T*>(static_cast<char*>(p) + byte_offset);
    }
};

struct PinnedBuffer {
    void* p = nullptr;
    std::size_t bytes = 0;
    ~PinnedBuffer() {
        if (p) cudaFreeHost(p);
    }
};

// (fastspec::to_string lives in the core, which this library does not link.)
const char* dtype_name(WeightDtype d) { return d == WeightDtype::f32 ? "f32" : d == WeightDtype::f16 ? "f16" : "bf16"; }

cudaDataType_t data_type(Elem e) { return e == Elem::f32 ? CUDA_R_32F : e == Elem::f16 ? CUDA_R_16F : CUDA_R_16BF; }

// --- cuBLASLt products -------------------------------------------------------------------------------------------------
// y (cols = rows of the batch, out) = W (out, in) x: in cuBLASLt's column-major terms D (out x rows) = op(A) B with
// A the row-major weights read as column-major (in x out) and transposed, B the activations (in x rows).
enum class Product { hidden, last, hidden_tangent, last_tangent };

struct LtPlan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
    dp::BiasPath bias = dp::BiasPath::none;  // kernel: matmul() applies the bias (+ReLU) after the product
    Elem d_elem = Elem::f32;                 // the output's dtype
    ~LtPlan() {
        if (d) cublasLtMatrixLayoutDestroy(d);
        if (b) cublasLtMatrixLayoutDestroy(b);
        if (a) cublasLtMatrixLayoutDestroy(a);
        if (op) cublasLtMatmulDescDestroy(op);
    }
};

// --- a workspace ---------------------------------------------------------------------------------------------------------

struct Workspace {
    cudaStream_t own_stream = nullptr;      // host-pointer calls run here
    cudaStream_t capture_stream = nullptr;  // graphs are captured here, launched on the caller's stream
    cublasLtHandle_t lt = nullptr;
    DeviceBuffer input, hidden[2], logits, intrinsic, staging_out, tangent_in, tangent_hidden[2], tangent_last, kernels,
        lt_workspace;
    std::size_t unit_tangent_rows = 0;  // rows of tangent_in holding the unit tangents
    PinnedBuffer pin_input[2], pin_kernels[2];
    cudaEvent_t staged[2] = {nullptr, nullptr};  // the slot's copies have been made: it may be refilled
    cudaEvent_t done = nullptr;                  // the last call's work on last_stream
    cudaStream_t last_stream = nullptr;
    bool used = false;
    dp::GraphCache<cudaGraphExec_t> graphs{8};
    std::vector<detail::BroadeningStage::Kernels> row_kernels;  // host, one per row of a chunk

    ~Workspace() {
        for (auto g : graphs.clear()) cudaGraphExecDestroy(g);
        for (auto e : staged)
            if (e) cudaEventDestroy(e);
        if (done) cudaEventDestroy(done);
        if (lt) cublasLtDestroy(lt);
        if (capture_stream) cudaStreamDestroy(capture_stream);
        if (own_stream) cudaStreamDestroy(own_stream);
    }
};

class CudaBackend final : public detail::DeviceBackend {
public:
    CudaBackend(const NetworkSpec& spec, const detail::BackendOptions& options);
    ~CudaBackend() override;

    std::string description() const override { return description_; }
    void copy_to_host(void* dst, const void* src, std::size_t bytes, std::uintptr_t stream) const override;
    void run(const detail::DeviceCall& call) const override;

private:
    struct Layer {
        int in = 0, out = 0;
        Elem ab = Elem::f32;          // the dtype of its weights and inputs: the file's, float32 for the first layer
        void* w = nullptr;            // device, in ab
        const float* bias32 = nullptr;  // device float32: the bias kernel's, and the epilogue's for a float32 output
        const void* bias16 = nullptr;   // device, the activations' dtype: the epilogue's for a 16-bit output
        bool f32_out = false;         // the output is float32 (the last layer, a float32 model, the first_f32 layer)
    };
    std::unique_ptr<Workspace> acquire() const;
    void release(std::unique_ptr<Workspace> ws) const;
    void grow(Workspace& ws, DeviceBuffer& b, std::size_t bytes, std::size_t batch, std::size_t total) const;
    void prepare(Workspace& ws, std::size_t rows, bool jacobian, bool host_output, std::size_t batch,
                 cudaStream_t stream) const;
    void grow_pinned(Workspace& ws, PinnedBuffer& b, std::size_t bytes, std::size_t batch) const;
    const LtPlan& plan(std::size_t layer, std::size_t cols, Product kind) const;
    void matmul(Workspace& ws, std::size_t layer, std::size_t cols, Product kind, const void* x, void* y,
                cudaStream_t s) const;
    void enqueue_network(Workspace& ws, std::size_t rows, bool jacobian, cudaStream_t s) const;
    void network(Workspace& ws, std::size_t rows, bool jacobian, cudaStream_t s) const;
    std::size_t stage_kernels(Workspace& ws, const detail::DeviceCall& call, std::size_t r0, std::size_t rows,
                              bool jacobian, PinnedBuffer& pin, int& max_half) const;

    NetworkSpec spec_;  // its weight pointers are not used after construction
    detail::BackendOptions options_;
    Elem elem_ = Elem::f32;
    dp::Dims dims_;
    std::vector<Layer> layers_;
    DeviceBuffer weights_;  // every layer's weights and biases, one allocation
    DeviceBuffer broadening_;  // node_lo | node_hi | hat_offset | hat | planes (forward) | planes (jacobian)
    const int* node_lo_ = nullptr;
    const int* node_hi_ = nullptr;
    const int* hat_offset_ = nullptr;
    const float* hat_ = nullptr;
    const BroadenPlane* planes_forward_ = nullptr;
    const BroadenPlane* planes_jacobian_ = nullptr;
    int n_planes_jacobian_ = 0;
    NetworkLabels net_;
    cublasComputeType_t compute_ = CUBLAS_COMPUTE_32F;
    std::string description_;
    cublasLtHandle_t lt_ = nullptr;  // for the heuristics

    mutable std::mutex plan_mutex_;
    mutable std::map<std::tuple<std::size_t, std::size_t, int>, std::unique_ptr<LtPlan>> plans_;
    mutable std::mutex pool_mutex_;
    mutable std::vector<std::unique_ptr<Workspace>> pool_;
};

CudaBackend::CudaBackend(const NetworkSpec& spec, const detail::BackendOptions& options)
    : spec_(spec), options_(options) {
    DeviceScope scope(options.device);
    elem_ = spec.dtype == WeightDtype::f32 ? Elem::f32 : spec.dtype == WeightDtype::f16 ? Elem::f16 : Elem::bf16;
    compute_ = elem_ == Elem::f32 && options.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    if (spec.network_labels.size() > std::size_t(kMaxNetworkLabels))
        throw DeviceError("device = cuda: at most " + std::to_string(kMaxNetworkLabels) + " network labels, this model has " +
                          std::to_string(spec.network_labels.size()));
    net_.n = int(spec.network_labels.size());
    for (int t = 0; t < net_.n; ++t) net_.label[t] = int(spec.network_labels[t]);

    dims_ = spec.dims;

    // The weights: one allocation, each block aligned.
    // Layer 0 of a 16-bit model is kept (and run) in float32: its inputs are the normalised labels.
    std::size_t total = 0;
    std::vector<std::size_t> w_at, b32_at, b16_at;
    for (std::size_t k = 0; k < spec.layers.size(); ++k) {
        const auto& L = spec.layers[k];
        const bool last = k + 1 == spec.layers.size();
        const std::size_t welem = k == 0 ? 4 : dims_.elem;
        w_at.push_back(total);
        total += dp::align_up(std::size_t(L.in) * L.out * welem);
        b32_at.push_back(total);
        total += dp::align_up(std::size_t(L.out) * 4);
        b16_at.push_back(total);
        if (!last && k > 0 && elem_ != Elem::f32) total += dp::align_up(std::size_t(L.out) * 2);
    }
    cudaError_t e = cudaMalloc(&weights_.p, total);
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        throw DeviceMemoryError("out of GPU memory on " + device_name(options.device) + ": the weights need " +
                                    dp::bytes_text(total),
                                0, total);
    }
    check(e, "cudaMalloc (weights)");
    weights_.bytes = total;
    std::vector<std::uint16_t> bias16;
    for (std::size_t k = 0; k < spec.layers.size(); ++k) {
        const auto& L = spec.layers[k];
        const bool last = k + 1 == spec.layers.size();
        Layer l;
        l.in = L.in;
        l.out = L.out;
        l.ab = k == 0 ? Elem::f32 : elem_;
        l.f32_out = last || l.ab == Elem::f32;
        l.w = weights_.as(w_at[k]);
        l.bias32 = weights_.as<const float>(b32_at[k]);
        const std::size_t wbytes = std::size_t(L.in) * L.out * (l.ab == Elem::f32 ? 4 : 2);
        check(cudaMemcpy(l.w, l.ab == Elem::f32 ? static_cast<const void*>(L.weights_f32) : L.weights, wbytes,
                         cudaMemcpyHostToDevice),
              "cudaMemcpy (weights)");
        check(cudaMemcpy(weights_.as(b32_at[k]), L.bias, std::size_t(L.out) * 4, cudaMemcpyHostToDevice),
              "cudaMemcpy (biases)");
        if (!l.f32_out) {
            bias16.resize(L.out);
            for (int i = 0; i < L.out; ++i)
                bias16[i] = elem_ == Elem::f16 ? dp::float_to_half(L.bias[i]) : dp::float_to_bf16(L.bias[i]);
            check(cudaMemcpy(weights_.as(b16_at[k]), bias16.data(), std::size_t(L.out) * 2, cudaMemcpyHostToDevice),
                  "cudaMemcpy (biases)");
            l.bias16 = weights_.as<const void>(b16_at[k]);
        }
        layers_.push_back(l);
    }

    if (spec.broadening) {
        // The node layout and the two plane lists, one allocation.
        std::vector<int> lo, hi, hat_off;
        std::vector<float> hat;
        for (const auto& nd : spec.nodes) {
            lo.push_back(nd.lo);
            hi.push_back(nd.hi);
            hat_off.push_back(int(hat.size()));
            hat.insert(hat.end(), nd.hat.begin(), nd.hat.end());
        }
        std::vector<BroadenPlane> fwd = {{-1, 0, -1, 0}}, jac = {{-1, 0, -1, 0}};
        for (std::size_t j = 0; j < spec.n_labels; ++j) {
            if (j == spec.vsini_label)
                jac.push_back({-1, 1, int(j), 1});
            else if (j == spec.resolution_label)
                jac.push_back({-1, 2, int(j), 2});
            else {
                const auto it = std::find(spec.network_labels.begin(), spec.network_labels.end(), j);
                if (it == spec.network_labels.end()) throw DeviceError("device = cuda: label " + std::to_string(j) + " has no role");
                jac.push_back({int(it - spec.network_labels.begin()), 0, int(j), 0});
            }
        }
        n_planes_jacobian_ = int(jac.size());
        jac.push_back({-1, 3, -2, 0});  // dF/dvmac, after the others: used when the call asks for it
        const std::size_t n = lo.size();
        const std::size_t at_hi = dp::align_up(n * 4), at_off = at_hi + dp::align_up(n * 4),
                          at_hat = at_off + dp::align_up(n * 4), at_pf = at_hat + dp::align_up(hat.size() * 4),
                          at_pj = at_pf + dp::align_up(fwd.size() * sizeof(BroadenPlane)),
                          bytes = at_pj + dp::align_up(jac.size() * sizeof(BroadenPlane));
        check(cudaMalloc(&broadening_.p, bytes), "cudaMalloc (broadening nodes)");
        broadening_.bytes = bytes;
        check(cudaMemcpy(broadening_.as(), lo.data(), n * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
        check(cudaMemcpy(broadening_.as(at_hi), hi.data(), n * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
        check(cudaMemcpy(broadening_.as(at_off), hat_off.data(), n * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
        check(cudaMemcpy(broadening_.as(at_hat), hat.data(), hat.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
        check(cudaMemcpy(broadening_.as(at_pf), fwd.data(), fwd.size() * sizeof(BroadenPlane), cudaMemcpyHostToDevice),
              "cudaMemcpy");
        check(cudaMemcpy(broadening_.as(at_pj), jac.data(), jac.size() * sizeof(BroadenPlane), cudaMemcpyHostToDevice),
              "cudaMemcpy");
        node_lo_ = broadening_.as<const int>();
        node_hi_ = broadening_.as<const int>(at_hi);
        hat_offset_ = broadening_.as<const int>(at_off);
        hat_ = broadening_.as<const float>(at_hat);
        planes_forward_ = broadening_.as<const BroadenPlane>(at_pf);
        planes_jacobian_ = broadening_.as<const BroadenPlane>(at_pj);
        int limit = 0;
        check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, options.device),
              "cudaDeviceGetAttribute");
        if (!broaden_reserve_shared(spec.max_half, limit))
            throw DeviceError("device = cuda: the broadening kernels (half-width " + std::to_string(spec.max_half) +
                              " pixels) need more shared memory than " + device_name(options.device) + " has");
    }
    check_lt(cublasLtCreate(&lt_), "cublasLtCreate");
    spec_.layers.clear();  // the host weights belong to the Model; nothing here reads them again
    description_ = device_name(options.device) + ", " + dtype_name(spec.dtype) + " weights" +
                   (compute_ == CUBLAS_COMPUTE_32F_FAST_TF32 ? ", tf32" : "") +
                   (options.graphs ? ", graphs" : ", no graphs");
}

CudaBackend::~CudaBackend() {
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(options_.device);
    cudaDeviceSynchronize();  // nothing of ours may still run when the buffers go
    pool_.clear();
    plans_.clear();
    if (lt_) cublasLtDestroy(lt_);
    cudaSetDevice(previous);
    // weights_ and broadening_ are freed after this (members; cudaFree needs no current device under UVA).
}

const LtPlan& CudaBackend::plan(std::size_t layer, std::size_t cols, Product kind) const {
    std::lock_guard<std::mutex> lock(plan_mutex_);
    auto& slot = plans_[{layer, cols, int(kind)}];
    if (slot) return *slot;
    auto p = std::make_unique<LtPlan>();
    const Layer& L = layers_[layer];
    // Layer 0 of a 16-bit model takes float32 inputs (and float32 tangents): its output is float32 too.
    p->d_elem = L.f32_out ? Elem::f32 : elem_;
    const cudaDataType_t ab = data_type(L.ab), d = data_type(p->d_elem);
    check_lt(cublasLtMatmulDescCreate(&p->op, compute_, CUDA_R_32F), "cublasLtMatmulDescCreate");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    check_lt(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "TRANSA");
    check_lt(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "TRANSB");
    check_lt(cublasLtMatrixLayoutCreate(&p->a, ab, std::uint64_t(L.in), std::uint64_t(L.out), L.in), "layout A");
    check_lt(cublasLtMatrixLayoutCreate(&p->b, ab, std::uint64_t(L.in), cols, L.in), "layout B");
    check_lt(cublasLtMatrixLayoutCreate(&p->d, d, std::uint64_t(L.out), cols, L.out), "layout D");
    cublasLtMatmulPreference_t pref = nullptr;
    check_lt(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    const std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, decltype(&cublasLtMatmulPreferenceDestroy)>
        pref_owner(pref, &cublasLtMatmulPreferenceDestroy);
    const std::size_t ws = dp::kLtWorkspace;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    cublasLtMatmulHeuristicResult_t result[4] = {};
    int found = 0;
    auto query = [&](cublasLtEpilogue_t epilogue, const void* bias) {
        check_lt(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue),
                 "EPILOGUE");
        if (bias)
            check_lt(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias),
                     "BIAS_POINTER");
        found = 0;
        result[0] = {};
        const cublasStatus_t st =
            cublasLtMatmulAlgoGetHeuristic(lt_, p->op, p->a, p->b, p->d, p->d, pref, 4, result, &found);
        return std::make_pair(st, dp::heuristic_usable(int(st), found, int(result[0].state)));
    };
    // The bias (+ReLU) fused into the epilogue where cuBLASLt has an algorithm for it (for n = 1 columns, or an odd
    // 16-bit output, it may have none); else no epilogue and the bias kernel after the product (matmul()).
    const bool has_bias = kind == Product::hidden || kind == Product::last;
    bool fused = false;
    if (has_bias) {
        const cublasLtEpilogue_t epilogue = kind == Product::hidden ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
        fused = query(epilogue, p->d_elem == Elem::f32 ? static_cast<const void*>(L.bias32) : L.bias16).second;
    }
    p->bias = dp::bias_path(has_bias, fused);
    if (!fused) {
        const auto [st, usable] = query(CUBLASLT_EPILOGUE_DEFAULT, nullptr);
        if (!usable)
            throw DeviceError("cuBLASLt has no algorithm for layer " + std::to_string(layer) + " (" +
                              std::to_string(L.out) + " x " + std::to_string(L.in) + ", " + std::to_string(cols) +
                              " columns, " + dtype_name(spec_.dtype) + "), status " + std::to_string(int(st)));
    }
    p->algo = result[0].algo;
    slot = std::move(p);
    return *slot;
}

void CudaBackend::matmul(Workspace& ws, std::size_t layer, std::size_t cols, Product kind, const void* x, void* y,
                         cudaStream_t s) const {
    const LtPlan& p = plan(layer, cols, kind);
    const Layer& L = layers_[layer];
    const float one = 1.0f, zero = 0.0f;
    check_lt(cublasLtMatmul(ws.lt, p.op, &one, L.w, p.a, x, p.b, &zero, y, p.d, y, p.d, &p.algo, ws.lt_workspace.p,
                            ws.lt_workspace.bytes, s),
             "cublasLtMatmul");
    if (p.bias == dp::BiasPath::kernel) {  // no fused epilogue: the bias (+ReLU) in place
        launch_bias_act(y, p.d_elem, y, p.d_elem, L.bias32, cols, L.out, kind == Product::hidden, s);
        check_launch("bias_act");
    }
}

std::unique_ptr<Workspace> CudaBackend::acquire() const {
    {
        std::lock_guard<std::mutex> lock(pool_mutex_);
        if (!pool_.empty()) {
            auto ws = std::move(pool_.back());
            pool_.pop_back();
            return ws;
        }
    }
    auto ws = std::make_unique<Workspace>();
    check(cudaStreamCreateWithFlags(&ws->own_stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaStreamCreateWithFlags(&ws->capture_stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check_lt(cublasLtCreate(&ws->lt), "cublasLtCreate");
    for (auto& e : ws->staged) check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    check(cudaEventCreateWithFlags(&ws->done, cudaEventDisableTiming), "cudaEventCreate");
    return ws;
}

void CudaBackend::release(std::unique_ptr<Workspace> ws) const {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    pool_.push_back(std::move(ws));
}

void CudaBackend::grow(Workspace& ws, DeviceBuffer& b, std::size_t bytes, std::size_t batch, std::size_t total) const {
    if (bytes <= b.bytes) return;
    for (auto g : ws.graphs.clear()) cudaGraphExecDestroy(g);  // they point at the old buffers
    if (b.p) {
        check(cudaFree(b.p), "cudaFree");  // synchronises the device: nothing still uses the old buffer
        b.p = nullptr;
        b.bytes = 0;
    }
    const cudaError_t e = cudaMalloc(&b.p, bytes);
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        b.p = nullptr;
        std::size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        throw DeviceMemoryError("out of GPU memory on " + device_name(options_.device) + ": a batch of " +
                                    std::to_string(batch) + " rows needs a workspace of " + dp::bytes_text(total) +
                                    " (could not allocate " + dp::bytes_text(bytes) + "; " + dp::bytes_text(free_b) +
                                    " free of " + dp::bytes_text(total_b) + "); use a smaller max_chunk or batch",
                                batch, total);
    }
    check(e, "cudaMalloc (workspace)");
    b.bytes = bytes;
}

void CudaBackend::grow_pinned(Workspace& ws, PinnedBuffer& b, std::size_t bytes, std::size_t batch) const {
    if (bytes <= b.bytes) return;
    if (b.p) {
        // The copies out of the staging slots (recorded before staged[]) must be done before the memory goes;
        // cudaFreeHost's own synchronisation is not relied on.
        for (auto e : ws.staged) check(cudaEventSynchronize(e), "cudaEventSynchronize (staging)");
        check(cudaFreeHost(b.p), "cudaFreeHost");
        b.p = nullptr;
        b.bytes = 0;
    }
    const cudaError_t e = cudaMallocHost(&b.p, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        b.p = nullptr;
        throw DeviceMemoryError("out of pinned host memory: a batch of " + std::to_string(batch) + " rows needs " +
                                    dp::bytes_text(bytes) + " of staging (" + cudaGetErrorString(e) + ")",
                                batch, bytes);
    }
    b.bytes = bytes;
}

void CudaBackend::prepare(Workspace& ws, std::size_t rows, bool jacobian, bool host_output, std::size_t batch,
                          cudaStream_t stream) const {
    const dp::Buffers need = dp::buffers(dims_, rows, jacobian, host_output);
    const std::size_t total = need.total();
    grow(ws, ws.input, need.input, batch, total);
    grow(ws, ws.hidden[0], need.hidden, batch, total);
    grow(ws, ws.hidden[1], need.hidden, batch, total);
    grow(ws, ws.logits, need.logits, batch, total);
    grow(ws, ws.intrinsic, need.intrinsic, batch, total);
    grow(ws, ws.staging_out, need.staging_out, batch, total);
    if (jacobian) {
        const std::size_t before = ws.tangent_in.bytes;
        grow(ws, ws.tangent_in, need.tangent_in, batch, total);
        if (ws.tangent_in.bytes != before) ws.unit_tangent_rows = 0;
        grow(ws, ws.tangent_hidden[0], need.tangent_hidden, batch, total);
        grow(ws, ws.tangent_hidden[1], need.tangent_hidden, batch, total);
        grow(ws, ws.tangent_last, need.tangent_last, batch, total);
    }
    grow(ws, ws.kernels, need.kernels, batch, total);
    grow(ws, ws.lt_workspace, need.lt_workspace, batch, total);
    for (auto& p : ws.pin_input) grow_pinned(ws, p, need.input, batch);
    if (dims_.broadening)
        for (auto& p : ws.pin_kernels) grow_pinned(ws, p, need.kernels, batch);
    if (jacobian && ws.unit_tangent_rows < rows) {  // float32, as the input rows
        launch_unit_tangents(ws.tangent_in.p, Elem::f32, rows, int(dims_.n_network), int(dims_.input_dim),
                             int(spec_.latent_dim), stream);
        check_launch("unit_tangents");
        ws.unit_tangent_rows = rows;
    }
}

// The network pass of one chunk on the workspace's buffers: ws.input holds [out, jacobian pointers | input rows |
// tangent scales].
void CudaBackend::enqueue_network(Workspace& ws, std::size_t rows, bool jacobian, cudaStream_t s) const {
    const std::size_t nt = dims_.n_network, np = dims_.n_pixels;
    const void* x = ws.input.as(dp::kAlign);
    const void* tg = ws.tangent_in.p;
    const std::size_t L = layers_.size();
    for (std::size_t k = 0; k + 1 < L; ++k) {
        void* h = ws.hidden[k % 2].p;
        const bool via_f32 = layers_[k].f32_out && elem_ != Elem::f32;  // layer 0 of a 16-bit model
        // via_f32: the float32 product goes through the logits (tangent_last) buffer, unused until the last layer,
        // then is converted to the activations' dtype.
        matmul(ws, k, rows, Product::hidden, x, via_f32 ? ws.logits.p : h, s);
        if (via_f32) {
            launch_bias_act(ws.logits.p, Elem::f32, h, elem_, nullptr, rows, layers_[k].out, false, s);
            check_launch("bias_act (first layer)");
        }
        if (jacobian) {
            void* t = ws.tangent_hidden[k % 2].p;
            matmul(ws, k, rows * nt, Product::hidden_tangent, tg, via_f32 ? ws.tangent_last.p : t, s);
            if (via_f32) {
                launch_bias_act(ws.tangent_last.p, Elem::f32, t, elem_, nullptr, rows * nt, layers_[k].out, false, s);
                check_launch("bias_act (first layer tangents)");
            }
            launch_relu_mask(t, h, elem_, rows, int(nt), layers_[k].out, s);
            check_launch("relu_mask");
            tg = t;
        }
        x = h;
    }
    float* logits = ws.logits.as<float>();
    matmul(ws, L - 1, rows, Product::last, x, logits, s);
    float* const* slots = ws.input.as<float* const>();
    const float scale = float(spec_.output_scale), offset = float(spec_.output_offset);
    float* intrinsic = dims_.broadening ? ws.intrinsic.as<float>() : nullptr;
    if (!jacobian) {
        launch_sigmoid_output(logits, rows, np, scale, offset, intrinsic, slots, s);
        check_launch("sigmoid_output");
    } else {
        float* tl = ws.tangent_last.as<float>();
        matmul(ws, L - 1, rows * nt, Product::last_tangent, tg, tl, s);
        const float* tscale = ws.input.as<const float>(dp::kAlign + dp::align_up(rows * dims_.input_dim * 4));
        launch_jacobian_output(logits, tl, tscale, rows, np, int(dims_.n_labels), net_, scale, offset, dims_.broadening,
                               intrinsic, slots, s);
        check_launch("jacobian_output");
    }
}

void CudaBackend::network(Workspace& ws, std::size_t rows, bool jacobian, cudaStream_t s) const {
    if (!options_.graphs) return enqueue_network(ws, rows, jacobian, s);
    const dp::GraphKey key{rows, jacobian};
    switch (ws.graphs.action(key)) {
        case dp::GraphAction::plain:
            return enqueue_network(ws, rows, jacobian, s);
        case dp::GraphAction::replay:
            check(cudaGraphLaunch(*ws.graphs.find(key), s), "cudaGraphLaunch");
            return;
        case dp::GraphAction::capture: {
            // Any failure of the capture or the instantiation (unsupported in this context, out of memory, ...)
            // leaves this key on plain launches for good, and this call runs them; the stream leaves capture mode
            // and the sticky error is cleared first.
            cudaGraph_t graph = nullptr;
            cudaGraphExec_t exec = nullptr;
            bool ok = cudaStreamBeginCapture(ws.capture_stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
            if (ok) {
                try {
                    enqueue_network(ws, rows, jacobian, ws.capture_stream);
                } catch (...) {
                    ok = false;
                }
                cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
                if (cudaStreamIsCapturing(ws.capture_stream, &capturing) != cudaSuccess ||
                    capturing != cudaStreamCaptureStatusNone) {
                    if (cudaStreamEndCapture(ws.capture_stream, &graph) != cudaSuccess) ok = false;
                }
                ok = ok && graph != nullptr && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
                if (graph) cudaGraphDestroy(graph);
            }
            if (!ok) {
                if (exec) cudaGraphExecDestroy(exec);
                cudaGetLastError();
                ws.graphs.failed(key);
                return enqueue_network(ws, rows, jacobian, s);
            }
            for (auto g : ws.graphs.store(key, exec)) cudaGraphExecDestroy(g);
            check(cudaGraphLaunch(exec, s), "cudaGraphLaunch");
            return;
        }
    }
}

// Builds rows [r0, r0 + rows)'s broadening kernels (the core's BroadeningStage, several host threads for a large
// chunk) into the pinned slot: [row records | node half-widths | taps, compact]. Returns the bytes to copy.
std::size_t CudaBackend::stage_kernels(Workspace& ws, const detail::DeviceCall& call, std::size_t r0, std::size_t rows,
                                       bool jacobian, PinnedBuffer& pin, int& max_half) const {
    auto& ks = ws.row_kernels;
    if (ks.size() < rows) ks.resize(rows);
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    const std::size_t n_threads = std::min<std::size_t>({hw, 32, (rows + 7) / 8});
    auto build = [&](std::size_t first, std::size_t step) {
        for (std::size_t i = first; i < rows; i += step) call.host->kernels(r0 + i, jacobian, ks[i]);
    };
    if (n_threads <= 1) {
        build(0, 1);
    } else {
        std::vector<std::thread> pool;
        std::exception_ptr error;
        std::mutex error_mutex;
        for (std::size_t t = 0; t < n_threads; ++t)
            pool.emplace_back([&, t] {
                try {
                    build(t, n_threads);
                } catch (...) {
                    std::lock_guard<std::mutex> lock(error_mutex);
                    if (!error) error = std::current_exception();
                }
            });
        for (auto& th : pool) th.join();
        if (error) std::rethrow_exception(error);
    }
    const std::size_t nodes = dims_.nodes;
    char* base = static_cast<char*>(pin.p);
    auto* rec = reinterpret_cast<dp::RowRecord*>(base);
    int* node_half = reinterpret_cast<int*>(base + dp::align_up(rows * sizeof(dp::RowRecord)));
    const std::size_t taps_at = dp::align_up(rows * sizeof(dp::RowRecord)) + dp::align_up(rows * nodes * 4);
    float* taps = reinterpret_cast<float*>(base + taps_at);
    std::size_t used = 0;
    max_half = 0;
    for (std::size_t i = 0; i < rows; ++i) {
        const auto& k = ks[i];
        const std::size_t per = nodes * (2 * std::size_t(k.half) + 1);
        rec[i].taps = used;
        rec[i].half = k.half;
        rec[i].zero = 0;
        if (jacobian && call.clip) {
            if (call.host->clamped(r0 + i, spec_.vsini_label)) rec[i].zero |= 1;
            if (call.host->clamped(r0 + i, spec_.resolution_label)) rec[i].zero |= 2;
        }
        max_half = std::max(max_half, k.half);
        for (std::size_t s = 0; s < nodes; ++s) node_half[i * nodes + s] = k.node_half[s];
        std::memcpy(taps + used, k.flux.data(), per * 4);
        if (jacobian) {
            std::memcpy(taps + used + per, k.d_vsini.data(), per * 4);
            std::memcpy(taps + used + 2 * per, k.d_resolution.data(), per * 4);
            std::memcpy(taps + used + 3 * per, k.d_vmac.data(), per * 4);
        }
        used += per * (jacobian ? 4 : 1);
    }
    return taps_at + used * 4;
}

void CudaBackend::copy_to_host(void* dst, const void* src, std::size_t bytes, std::uintptr_t stream) const {
    DeviceScope scope(options_.device);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s), "cudaMemcpyAsync (z to the host)");
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

void check_device_pointer(const void* p, int device, const char* name) {
    cudaPointerAttributes a{};
    const cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) fail(e, std::string("cudaPointerGetAttributes (") + name + ")");
    if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged)
        throw DeviceError(std::string(name) + " is not device memory (a host pointer was given to a *_device call)");
    if (a.type == cudaMemoryTypeDevice && a.device != device)
        throw DeviceError(std::string(name) + " is on cuda:" + std::to_string(a.device) + ", but this decoder runs on cuda:" +
                          std::to_string(device));
}

void CudaBackend::run(const detail::DeviceCall& call) const {
    if (call.n == 0) return;
    DeviceScope scope(options_.device);
    const bool jacobian = call.jacobian != nullptr, host_output = !call.on_device;
    const bool vmac_column = jacobian && call.jacobian_vmac != nullptr;
    if (call.on_device) {
        check_device_pointer(call.out, options_.device, "out");
        if (jacobian) check_device_pointer(call.jacobian, options_.device, "jacobian");
        if (vmac_column) check_device_pointer(call.jacobian_vmac, options_.device, "jacobian_vmac");
    }
    const std::size_t np = dims_.n_pixels, nl = dims_.n_labels, nt = dims_.n_network;
    const std::size_t rows = dp::chunk_rows(dims_, call.n, options_.max_chunk, jacobian, host_output);
    auto ws = acquire();
    cudaStream_t stream = reinterpret_cast<cudaStream_t>(call.stream);
    if (host_output && call.stream == 0) stream = ws->own_stream;
    if (call.stream != 0) {
        int stream_device = -1;
        if (cudaStreamGetDevice(stream, &stream_device) == cudaSuccess && stream_device != options_.device) {
            release(std::move(ws));
            throw DeviceError("the stream belongs to cuda:" + std::to_string(stream_device) +
                              ", but this decoder runs on cuda:" + std::to_string(options_.device));
        }
        cudaGetLastError();
    }
    try {
        if (ws->used && ws->last_stream != stream) check(cudaStreamWaitEvent(stream, ws->done, 0), "cudaStreamWaitEvent");
        prepare(*ws, rows, jacobian, host_output, call.n, stream);
        int slot = 0;
        for (const auto& [r0, R] : dp::chunks(call.n, rows)) {
            check(cudaEventSynchronize(ws->staged[slot]), "cudaEventSynchronize");  // the slot's last copy is done
            // [out, jacobian pointers | input rows (float32) | tangent scales]
            char* pin = static_cast<char*>(ws->pin_input[slot].p);
            float* out_dst = host_output ? ws->staging_out.as<float>() : call.out + r0 * np;
            float* jac_dst = !jacobian ? nullptr : host_output ? ws->staging_out.as<float>() + R * np : call.jacobian + r0 * np * nl;
            float* vmac_dst = !vmac_column ? nullptr
                              : host_output ? ws->staging_out.as<float>() + R * np * (1 + nl)
                                            : call.jacobian_vmac + r0 * np;
            float* ptrs[2] = {out_dst, jac_dst};
            std::memcpy(pin, ptrs, sizeof ptrs);
            const std::size_t in_count = R * dims_.input_dim;
            call.host->input_rows(r0, R, reinterpret_cast<float*>(pin + dp::kAlign));  // float32 for every dtype
            if (jacobian)
                call.host->tangent_scales(r0, R, reinterpret_cast<float*>(pin + dp::kAlign + dp::align_up(in_count * 4)));
            check(cudaMemcpyAsync(ws->input.p, pin, dp::input_bytes(dims_, R, jacobian), cudaMemcpyHostToDevice, stream),
                  "cudaMemcpyAsync (inputs)");
            int max_half = 0;
            if (dims_.broadening) {
                const std::size_t bytes = stage_kernels(*ws, call, r0, R, jacobian, ws->pin_kernels[slot], max_half);
                check(cudaMemcpyAsync(ws->kernels.p, ws->pin_kernels[slot].p, bytes, cudaMemcpyHostToDevice, stream),
                      "cudaMemcpyAsync (broadening kernels)");
            }
            check(cudaEventRecord(ws->staged[slot], stream), "cudaEventRecord");
            network(*ws, R, jacobian, stream);
            if (dims_.broadening) {
                BroadenArgs a;
                a.flux = ws->intrinsic.as<const float>();
                a.tangents = jacobian ? ws->tangent_last.as<const float>() : nullptr;
                a.nt = int(nt);
                a.n_pixels = int(np);
                a.n_labels = int(nl);
                a.n_nodes = int(dims_.nodes);
                a.kernels_per_row = jacobian ? 4 : 1;
                a.records = ws->kernels.as<const dp::RowRecord>();
                a.node_half = ws->kernels.as<const int>(dp::align_up(R * sizeof(dp::RowRecord)));
                a.taps = ws->kernels.as<const float>(dp::align_up(R * sizeof(dp::RowRecord)) + dp::align_up(R * dims_.nodes * 4));
                a.node_lo = node_lo_;
                a.node_hi = node_hi_;
                a.hat_offset = hat_offset_;
                a.hat = hat_;
                a.planes = jacobian ? planes_jacobian_ : planes_forward_;
                a.n_planes = jacobian ? n_planes_jacobian_ + (vmac_column ? 1 : 0) : 1;
                a.out = out_dst;
                a.jacobian = jac_dst;
                a.jacobian_vmac = vmac_dst;
                launch_broaden(a, R, max_half, stream);
                check_launch("broaden");
            } else if (vmac_column) {  // no broadening stage: vmac is 0 (the core checked), and so is its column
                check(cudaMemsetAsync(vmac_dst, 0, R * np * 4, stream), "cudaMemsetAsync (jacobian_vmac)");
            }
            if (host_output) {
                check(cudaMemcpyAsync(call.out + r0 * np, out_dst, R * np * 4, cudaMemcpyDeviceToHost, stream),
                      "cudaMemcpyAsync (out to the host)");
                if (jacobian)
                    check(cudaMemcpyAsync(call.jacobian + r0 * np * nl, jac_dst, R * np * nl * 4, cudaMemcpyDeviceToHost,
                                          stream),
                          "cudaMemcpyAsync (jacobian to the host)");
                if (vmac_column)
                    check(cudaMemcpyAsync(call.jacobian_vmac + r0 * np, vmac_dst, R * np * 4, cudaMemcpyDeviceToHost,
                                          stream),
                          "cudaMemcpyAsync (jacobian_vmac to the host)");
            }
            slot ^= 1;
        }
        check(cudaEventRecord(ws->done, stream), "cudaEventRecord");
        ws->last_stream = stream;
        ws->used = true;
        if (host_output) check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    } catch (...) {
        // Let whatever was queued finish before the workspace can be reused (its buffers may be in flight).
        cudaStreamSynchronize(stream);
        cudaGetLastError();
        ws->used = false;
        release(std::move(ws));
        throw;
    }
    release(std::move(ws));
}

// --- the module ------------------------------------------------------------------------------------------------------

int device_count(std::string* why) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaSuccess) return n;
    cudaGetLastError();
    if (e == cudaErrorNoDevice) return 0;
    if (why) {
        int driver = 0;
        cudaDriverGetVersion(&driver);
        *why = std::string("no usable CUDA driver/GPU: ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")" +
               (driver ? "; driver supports CUDA " + std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10)
                       : std::string("; no CUDA driver found (libcuda.so)")) +
               ", this backend was built with CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
               std::to_string(CUDART_VERSION % 1000 / 10);
    }
    return -1;
}

detail::DeviceBackend* create(const NetworkSpec& spec, const detail::BackendOptions& options) {
    return new CudaBackend(spec, options);
}

#ifndef FASTSPEC_CUDA_ARCHS
#define FASTSPEC_CUDA_ARCHS "?"
#endif

const std::string& summary() {
    static const std::string s = "CUDA runtime " + std::to_string(CUDART_VERSION / 1000) + "." +
                                 std::to_string(CUDART_VERSION % 1000 / 10) + " (static), cuBLASLt " +
                                 std::to_string(cublasLtGetVersion()) + ", architectures " FASTSPEC_CUDA_ARCHS;
    return s;
}

}  // namespace

}  // namespace fastspec::cuda

extern "C" __attribute__((visibility("default"))) const fastspec::detail::BackendModule* fastspec_cuda_backend_module() {
    static fastspec::detail::BackendModule module = {fastspec::detail::kBackendAbi, nullptr,
                                                     &fastspec::cuda::device_count, &fastspec::cuda::create};
    module.summary = fastspec::cuda::summary().c_str();
    return &module;
}
