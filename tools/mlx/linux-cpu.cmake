# CMake toolchain file for mlx-sys on Linux: build mlx-c against the prebuilt MLX CPU library from the
# PyPI `mlx-cpu` wheel (unpacked by `cargo xtask setup` into .toolchain/mlx-cpu) instead of building MLX.
# On macOS this file changes nothing: mlx-sys builds MLX with Metal as usual.
if(CMAKE_HOST_SYSTEM_NAME STREQUAL "Linux")
  if(DEFINED ENV{EDGECHAT_MLX_DIR})
    set(_edgechat_mlx "$ENV{EDGECHAT_MLX_DIR}")
  else()
    get_filename_component(_edgechat_mlx "${CMAKE_CURRENT_LIST_DIR}/../../.toolchain/mlx-cpu" ABSOLUTE)
  endif()
  set(MLX_C_USE_SYSTEM_MLX ON CACHE BOOL "" FORCE)
  set(MLX_C_BUILD_EXAMPLES OFF CACHE BOOL "" FORCE)
  set(MLX_DIR "${_edgechat_mlx}/mlx/share/cmake/MLX" CACHE PATH "" FORCE)
  # The cmake crate passes CMAKE_CXX_FLAGS explicitly, so the shim is added after project() instead.
  set(CMAKE_PROJECT_INCLUDE "${CMAKE_CURRENT_LIST_DIR}/force-include-format-shim.cmake")
endif()
