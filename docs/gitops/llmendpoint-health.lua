-- Argo CD health check for llm-endpoints.io/LLMEndpoint (Lua 5.1, as Argo CD runs it).
-- Install: see docs/gitops/README.md. Reads only status, which the operator keeps true:
--   the operator has not observed the latest spec yet      -> Progressing
--   Degraded condition True, or phase Failed               -> Degraded (with the condition's message)
--   phase ScaledToZero                                     -> Healthy (idle by design; wakes on a request)
--   phase Paused (spec.paused)                             -> Suspended (held at zero until resumed)
--   phase Running with Ready True                          -> Healthy
--   anything else (Pending, Loading, rolling out)          -> Progressing (with the Ready condition's message)
local health = {status = "Progressing", message = "Waiting for the operator to report status"}
if obj.status == nil then
  return health
end
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  health.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return health
end
local conditions = {}
for _, condition in ipairs(status.conditions or {}) do
  conditions[condition.type] = condition
end
local ready, degraded = conditions["Ready"], conditions["Degraded"]
local function say(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return fallback
end
if (degraded ~= nil and degraded.status == "True") or status.phase == "Failed" then
  health.status = "Degraded"
  health.message = say(degraded, say(ready, "The endpoint failed"))
elseif status.phase == "Paused" then
  health.status = "Suspended"
  health.message = say(ready, "Paused: spec.paused is set")
elseif status.phase == "ScaledToZero" then
  health.status = "Healthy"
  health.message = say(conditions["ScaledToZero"], "Scaled to zero; the next request wakes it")
elseif status.phase == "Running" and ready ~= nil and ready.status == "True" then
  health.status = "Healthy"
  health.message = say(ready, "Running")
else
  health.message = say(ready, "Phase " .. tostring(status.phase))
end
return health
