// fastspec: the public C++ API of the inference core.
//
// One header, no Python or CUDA types. Load a model file (docs/model-format.md) into an immutable
// Model, build a Decoder on it, and call forward() with physical labels to get flux spectra. A version-2
// model's network gives the intrinsic spectrum and the Decoder broadens it (rotation, then the instrumental
// Gaussian) exactly; the same stage is available on its own as Broadening.
//
//     auto model = fastspec::Model::load("model.fsm");
//     fastspec::Decoder decoder(model);
//     std::vector<double> labels = {5777, 4.44, 2.0, 0.0, 1.0, 50000};
//     std::vector<float> flux(model.n_pixels());
//     decoder.forward(labels.data(), 1, flux.data());
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastspec {

// Every error this library throws derives from Error.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// A model file that cannot be used; the message names the file and the problem.
class ModelFileError : public Error {
public:
    using Error::Error;
};

// A model file that cannot be opened or read (missing, permissions, I/O error).
// errno_value() is the errno of the failed call (ENOENT for a missing file).
class FileAccessError : public Error {
public:
    FileAccessError(const std::string& message, int errno_value) : Error(message), errno_(errno_value) {}
    int errno_value() const noexcept { return errno_; }

private:
    int errno_;
};

// Bad input to Decoder::forward; the message names the label (or z entry) and the row.
class InputError : public Error {
public:
    using Error::Error;
};

// The CUDA backend cannot be used: not built, its library (libfastspec_cuda.so) or a driver/GPU missing, a CUDA or
// cuBLAS call failed, or a pointer or stream that belongs to another device. The message says which.
class DeviceError : public Error {
public:
    using Error::Error;
};

// Out of GPU memory; the message names the batch (rows) and the bytes that could not be allocated.
class DeviceMemoryError : public DeviceError {
public:
    DeviceMemoryError(const std::string& message, std::size_t batch, std::size_t bytes)
        : DeviceError(message), batch_(batch), bytes_(bytes) {}
    std::size_t batch() const noexcept { return batch_; }
    std::size_t bytes() const noexcept { return bytes_; }

private:
    std::size_t batch_, bytes_;
};

enum class Scaling : std::uint32_t { linear = 1, log10 = 2 };
enum class Activation : std::uint32_t { relu = 1, sigmoid = 2 };
enum class WeightDtype : std::uint32_t { f32 = 1, f16 = 2, bf16 = 3 };
enum class Medium : std::uint32_t { air = 1, vacuum = 2 };

// "linear"/"log10", "relu"/"sigmoid", "f32"/"f16"/"bf16", "air"/"vacuum".
const char* to_string(Scaling s) noexcept;
const char* to_string(Activation a) noexcept;
const char* to_string(WeightDtype d) noexcept;
const char* to_string(Medium m) noexcept;

// What a label drives: an input of the network, or a parameter of the broadening stage.
enum class LabelRole : std::uint32_t { network = 0, vsini = 1, resolution = 2 };
// What a spectrum's pixels hold, and so which kernels the broadening stage uses: samples at the pixel centres,
// or the flux integrated over each pixel (version-3 models; SYNSPEC's mesh integrated, what lines narrower than a
// pixel need). Either way the stage returns the broadened spectrum at the pixel centres.
enum class Sampling : std::uint32_t { point = 1, pixel_mean = 2 };
const char* to_string(LabelRole r) noexcept;  // "network"/"vsini"/"resolution"

struct LabelInfo {
    std::string name, unit;
    double min = 0, max = 0;      // trained range, physical units
    Scaling scaling = Scaling::linear;
    double norm_offset = 0, norm_scale = 1;  // network input = (s(x) - norm_offset) / norm_scale
    LabelRole role = LabelRole::network;
};

// The broadening stage of a version-2 model: rotation (Gray's profile, linear limb darkening epsilon,
// half-width lambda * vsini / c), then a Gaussian of FWHM = lambda / R, applied to the network's output.
struct BroadeningInfo {
    bool enabled = false;
    Sampling sampling = Sampling::point;  // what the network's pixels hold (pixel_mean: format version 3)
    double epsilon = 0.6;
    int segments = 8;  // the kernel widths follow lambda piecewise-linearly between segments + 1 nodes
    std::size_t vsini_label = 0, resolution_label = 0;  // indices into Model::labels()
};

struct LayerInfo {
    int in = 0, out = 0;
    Activation activation = Activation::relu;
};

// An immutable, validated decoder model. Copies share the same data (cheap).
class Model {
public:
    // Reads and validates the whole file. Throws FileAccessError if it cannot be read and
    // ModelFileError (message: "<path>: <problem>") if it is not a valid version-1 model file.
    static Model load(const std::string& path);

    int format_version() const;  // 1, 2 or 3
    std::size_t n_labels() const;  // physical labels, network and broadening ones
    std::size_t latent_dim() const;
    std::size_t n_pixels() const;
    std::size_t n_network_labels() const;  // labels with role network (all of them in version-1 files)
    std::size_t input_dim() const { return latent_dim() + n_network_labels(); }
    const std::vector<LabelInfo>& labels() const;
    const BroadeningInfo& broadening() const;
    const std::vector<LayerInfo>& layers() const;
    double wavelength_start() const;  // Å
    double wavelength_step() const;   // Å
    std::vector<double> wavelength() const;  // start + step * i, i < n_pixels
    Medium medium() const;
    WeightDtype weight_dtype() const;  // as stored; weights() are always float32
    double output_scale() const;
    double output_offset() const;
    const std::string& provenance_json() const;
    const std::string& path() const;  // the file it was loaded from

    // Layer k's weights, row-major (out, in) like torch.nn.Linear.weight, and its biases (out).
    // 16-bit weights are widened to float32 (exactly) on the first call, once per Model.
    const float* weights(std::size_t k) const;
    const float* biases(std::size_t k) const;
    // Layer k's weights exactly as stored (IEEE half or bfloat16 bits) for f16/bf16 models, nullptr for
    // f32 ones: the batch-1 kernel reads these directly (half the bytes of the float32 copy).
    const std::uint16_t* stored_weights16(std::size_t k) const;
    std::size_t parameter_count() const;

    // The emulator's own error, measured at export on held-out spectra (docs/model-format.md): the RMS of
    // (model - SYNSPEC) per pixel at a given (vsini, resolution), bilinear in vsini and log10 R between the
    // measured nodes and constant beyond them. Writes n_pixels floats and returns true, or returns false
    // (out untouched) when the file carries none.
    bool has_emulator_error() const;
    bool emulator_error(double vsini, double resolution, float* out) const;

    struct Impl;

private:
    explicit Model(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
    std::shared_ptr<const Impl> impl_;
};

// Where a Decoder computes. cuda needs the CUDA backend (BuildInfo::cuda_compiled) and a usable GPU
// (cuda_available()); its library is loaded only when such a Decoder is made.
enum class Device : std::uint32_t { cpu = 0, cuda = 1 };
const char* to_string(Device d) noexcept;  // "cpu"/"cuda"

struct DecoderOptions {
    // OpenBLAS threads used by this decoder's GEMMs. OpenBLAS keeps ONE thread count per process:
    // forward() sets it to this value when it differs, so decoders with different values in one
    // process switch it back and forth. 1 is the right choice on small or shared machines; for
    // parallelism over many spectra, call forward() from several threads instead (it is thread-safe).
    int threads = 1;
    // Rows processed per pass; bounds the workspace to max_chunk * widest hidden layer floats.
    std::size_t max_chunk = 1024;
    // For f16/bf16 models on CPUs with AVX-512F: compute batch-1 calls with a GEMV that reads the
    // 16-bit weights directly (memory-bound, so about twice as fast). Off: always OpenBLAS on float32.
    bool direct_16bit = true;
    // The backend. cuda: weights resident on GPU cuda_device in the file's dtype (f16/bf16 with float32
    // accumulation and 16-bit hidden activations; the first layer runs in float32 from float32 inputs, so that the
    // flux stays smooth in the labels), max_chunk rows per pass bound the device workspace too. Throws DeviceError when the backend
    // or a GPU is missing, DeviceMemoryError when the weights do not fit.
    Device device = Device::cpu;
    int cuda_device = 0;
    // cuda: replay repeated calls at one batch size from a CUDA graph (captured on the second call at that size).
    bool cuda_graphs = true;
    // cuda, f32 models: TF32 tensor-core products (about 1e-3 relative error) instead of full float32.
    bool tf32 = false;
};

class Decoder {
public:
    explicit Decoder(Model model, DecoderOptions options = {});
    ~Decoder();
    Decoder(const Decoder&) = delete;
    Decoder& operator=(const Decoder&) = delete;
    Decoder(Decoder&&) noexcept;
    Decoder& operator=(Decoder&&) noexcept;

    // labels: row-major (n, n_labels) in physical units (all labels, broadening ones included); z: row-major (n, latent_dim) or nullptr
    // for z = 0; out: row-major (n, n_pixels). Every label (and z entry) is validated before anything
    // is written: a non-finite value, or one outside the model's range unless clip is true (then it
    // is clamped to the range), throws InputError. Const and thread-safe: concurrent calls on one
    // Decoder are fine (workspaces are pooled, not allocated per call once warm).
    //
    // vmac: nullptr, or n values (one per row) of Gray's radial-tangential macroturbulence zeta in km/s, applied in
    // the broadening stage with rotation and the instrumental profile (docs/model-format.md, "Macroturbulence"). It is
    // not a label: it is not clipped, and must be finite and in [0, Broadening::max_vmac()] (else InputError). Only a
    // pixel-mean stage (format-3 models) has it: vmac > 0 on another model throws InputError naming its format.
    // nullptr and zeros give the results without it, bit for bit.
    //
    // resolution_factors: nullptr, or stage_node_wavelengths().size() values g_s shared by all n rows: a line-spread
    // function that varies along the range. Node s of the broadening stage then takes R_s = R * g_s (R the row's
    // resolution label, clamped first with clip: the LSF's scale; g its shape), blended between nodes like every
    // kernel width (docs/model-format.md, "Line-spread function"). Every g_s must be finite and > 0 and every R_s
    // within the R label's range (an LSF narrower than the model represents is refused), else InputError naming the
    // row, the node and its wavelength. nullptr and all ones give the results without it, bit for bit.
    void forward(const double* labels, std::size_t n, float* out, const float* z = nullptr,
                 bool clip = false, const double* vmac = nullptr, const double* resolution_factors = nullptr) const;

    // forward() plus the Jacobian of the flux with respect to the physical labels, in one call (forward-
    // mode differentiation through the network, about 1 + n_network_labels forward passes; the broadening
    // stage's columns come from the derivatives of its kernels, exactly). out is forward()'s
    // output bit for bit; jacobian: row-major (n, n_pixels, n_labels), dF/d(label) in physical units
    // (per K, per dex, per km/s, per unit of R). Same validation as forward(). With clip, a label outside
    // its range is clamped, so its derivative is 0 there (at the bounds themselves: the inside one-sided
    // derivative). At a ReLU kink (pre-activation exactly 0) the derivative of ReLU is taken as 0, as
    // torch does. Const and thread-safe like forward(). vmac as forward(); jacobian_vmac, when not null, receives
    // dF/dvmac (n, n_pixels) per km/s (0 at vmac = 0, where the flux is even in zeta). resolution_factors as
    // forward(); the R column is then dF/dR of the label R with the shape g held.
    void forward_jacobian(const double* labels, std::size_t n, float* out, float* jacobian,
                          const float* z = nullptr, bool clip = false, const double* vmac = nullptr,
                          float* jacobian_vmac = nullptr, const double* resolution_factors = nullptr) const;

    // Device memory entry points of a cuda Decoder (DeviceError on a cpu one). labels_host: host memory, as for
    // forward() (validated and normalised on the host, then copied to the GPU once); out (n, n_pixels) and
    // jacobian (n, n_pixels, n_labels) are device pointers on options().cuda_device; z (n, latent_dim, may be
    // nullptr) is device or host memory (it is read to the host with cudaMemcpyDefault, which tells them apart);
    // stream is a cudaStream_t (0: the legacy default stream). The work is queued on stream and the call returns
    // without waiting for it (z, when given, is first read to the host, which waits for stream). forward() and forward_jacobian() with host pointers work on a cuda Decoder too (they copy
    // in and out and wait). On the GPU, forward_jacobian's flux equals forward's within rounding (float
    // summation order may differ with the batch size), not bit for bit. vmac_host and resolution_factors_host: host
    // memory, as for forward(); jacobian_vmac_device: a device pointer (n, n_pixels) or nullptr.
    void forward_device(const double* labels_host, std::size_t n, float* out_device, std::uintptr_t stream,
                        const float* z_device = nullptr, bool clip = false, const double* vmac_host = nullptr,
                        const double* resolution_factors_host = nullptr) const;
    void forward_jacobian_device(const double* labels_host, std::size_t n, float* out_device,
                                 float* jacobian_device, std::uintptr_t stream, const float* z_device = nullptr,
                                 bool clip = false, const double* vmac_host = nullptr,
                                 float* jacobian_vmac_device = nullptr,
                                 const double* resolution_factors_host = nullptr) const;

    // The broadening stage's nodes: the wavelength (Å, the model's medium) where each node's kernel widths are
    // taken, in order; resolution_factors has one value per node. Empty for a model without a stage.
    std::vector<double> stage_node_wavelengths() const;

    const Model& model() const;
    const DecoderOptions& options() const;
    Device device() const;
    // A cuda Decoder: the GPU's name and the backend's settings, e.g. "NVIDIA H200 (device 0), f16, graphs";
    // a cpu one: "cpu".
    std::string device_description() const;
    // Whether batch-1 calls use the direct 16-bit GEMV (direct_16bit, a 16-bit model, AVX-512F).
    bool uses_direct_16bit() const;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

// The broadening stage on its own, for any spectrum on a uniform wavelength grid (the Decoder of a version-2
// model runs exactly this after its network). Like SYNSPEC's ROTIN: rotation with linear limb darkening
// epsilon, then a Gaussian of FWHM = lambda / R (and, on pixel means, radial-tangential macroturbulence). The input is point samples (read as their piecewise-linear
// interpolant) or pixel means (`sampling`); it is extended beyond both ends by its edge values, and the output is
// the broadened spectrum at the pixel centres (docs/model-format.md, "Broadening stage"). Const and thread-safe.
class Broadening {
public:
    // Kernels are sized for vsini <= max_vsini (km/s) and resolution >= min_resolution.
    Broadening(double wavelength_start, double wavelength_step, std::size_t n_pixels, double epsilon = 0.6,
               int segments = 8, double max_vsini = 300.0, double min_resolution = 1000.0,
               Sampling sampling = Sampling::point);
    // The stage of a version-2 model (its grid, epsilon, segments and label ranges); throws Error if it has none.
    explicit Broadening(const Model& model);
    ~Broadening();
    Broadening(Broadening&&) noexcept;
    Broadening& operator=(Broadening&&) noexcept;

    std::size_t n_pixels() const;
    // in, out: n_pixels floats (they may be the same array). vsini in [0, max_vsini] km/s (0: no rotation),
    // resolution >= min_resolution or +infinity (no instrumental profile); else InputError. d_vsini and
    // d_resolution, when not null, receive d(out)/d(vsini) (per km/s) and d(out)/d(resolution) (per unit of R),
    // from the analytic derivatives of the kernels (one-sided at vsini = 0).
    void apply(const float* in, double vsini, double resolution, float* out, float* d_vsini = nullptr,
               float* d_resolution = nullptr) const;
    // The same with Gray's radial-tangential macroturbulence (equal radial and tangential areas, no limb darkening) of
    // zeta = vmac km/s in [0, max_vmac()], one more factor of the pixel-mean stage's composite kernel; d_vmac, when
    // not null, receives d(out)/d(vmac) per km/s. vmac > 0 on a point-sample stage throws InputError. vmac = 0 is
    // the 6-argument apply bit for bit.
    // resolution_factors: nullptr (all ones: the same result bit for bit), or node_wavelengths().size() factors g_s
    // of a line-spread function that varies along the range: node s's Gaussian has FWHM = lambda_s / (resolution *
    // g_s), blended between nodes like every width. Each g_s must be finite and > 0, resolution finite, and
    // resolution * g_s >= min_resolution (and, for a model's stage, <= its R label's max); else InputError naming
    // the node and its wavelength. d_resolution is then the derivative by `resolution` with the g_s held.
    void apply(const float* in, double vsini, double resolution, double vmac, float* out, float* d_vsini,
               float* d_resolution, float* d_vmac, const double* resolution_factors = nullptr) const;
    static double max_vmac();  // 50 km/s
    // Where the stage takes its kernel widths: the wavelength (Å, the grid's medium) of each of its segments + 1
    // nodes (fewer on a grid of fewer pixels), in order; resolution_factors has one value per node.
    std::vector<double> node_wavelengths() const;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

// How this library was built: BLAS (name and config string), compiler, flags, CUDA.
struct BuildInfo {
    std::string blas, blas_config, compiler, cxx_flags, version;
    bool cuda_compiled = false;
};
BuildInfo build_info();

// Whether Device::cuda can be used here: the CUDA backend was built, its library loads, and a CUDA driver
// reports at least one GPU. Never throws; cuda_unavailable_reason() says why not ("" when available).
bool cuda_available() noexcept;
std::string cuda_unavailable_reason();

}  // namespace fastspec
